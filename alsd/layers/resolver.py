"""Layer resolution: (reference, blob or TOC digest) -> :class:`~alsd.layers.model.Layer`.

Finds the layer in the image's manifest (blob digest: podman <= 5.0; TOC digest: podman
>= 5.1), then reads its footer and TOC (:mod:`alsd.oci.tocplan`) or takes them from its
metadata record, and builds the two generations of its ``info`` file. The first lookup
of an image starts resolving all its layers at once (podman asks for them one after the
other; see developer-notes/protocol.md). Each layer resolves once (singleflight keyed by
(reference, blob digest)); failures are remembered for ``negative_cache_ttl_s``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from alsd.config import LayerSettings
from alsd.counters import ByteCounter
from alsd.errors import AlsdError, FormatError, NotLazyError, RegistryError, UnknownLayer
from alsd.fetch.fetcher import BlobSource
from alsd.layers import info
from alsd.layers.images import ImageCatalog
from alsd.layers.model import Image, Layer, LayerStats
from alsd.layers.ports import RegistryLike
from alsd.layers.records import Records, layer_key
from alsd.layers.singleflight import NegativeCache, SingleFlight
from alsd.oci import tocplan
from alsd.oci.annotations import toc_digest_annotation
from alsd.oci.layer_index import LayerIndex
from alsd.oci.ranges import bodies_fit
from alsd.oci.reference import Reference, parse_reference

log = logging.getLogger(__name__)


class LayerResolver:
    def __init__(
        self,
        registry: RegistryLike,
        images: ImageCatalog,
        records: Records,
        negative: NegativeCache[tuple[str, str]],
        settings: LayerSettings,
        stats: LayerStats,
        counter: ByteCounter,
        adopt: Callable[[Layer], None],
        on_image: Callable[[Image], None] | None = None,
    ) -> None:
        self._registry = registry
        self._images = images
        self._records = records
        self._negative = negative
        self._settings = settings
        self._stats = stats
        self._counter = counter
        self._adopt = adopt
        self._on_image = on_image
        self._flights: SingleFlight[tuple[str, str], Layer] = SingleFlight(negative)
        self._layers: dict[tuple[str, str], Layer] = {}
        self._layer_numbers = itertools.count(1)

    # ------------------------------------------------------------ the layers in memory

    def known(self, key: tuple[str, str]) -> Layer | None:
        return self._layers.get(key)

    def keep(self, layer: Layer) -> bool:
        """Hold ``layer`` in memory; False if a layer of that key is already held."""
        if layer.key in self._layers:
            return False
        self._layers[layer.key] = layer
        return True

    def forget(self, layer: Layer) -> None:
        if self._layers.get(layer.key) is layer:
            del self._layers[layer.key]

    def layers(self) -> list[Layer]:
        return list(self._layers.values())

    def resolving(self) -> int:
        return len(self._flights)

    def cancel_all(self) -> list[asyncio.Task[Layer]]:
        return self._flights.cancel_all()

    # ------------------------------------------------------------ lookup

    async def resolve(self, ref: str, digest: str) -> Layer:
        """The layer of ``ref`` whose blob or TOC digest is ``digest`` (no timeout here)."""
        img = await self._images.get(ref)
        pos = img.position_of(digest)
        if pos is None and time.time() - img.resolved_at > self._settings.negative_cache_ttl_s:
            # The tag may have moved since we resolved it: look once more.
            img = await self._images.get(ref, refresh=True)
            pos = img.position_of(digest)
        if pos is None:
            raise UnknownLayer(f"{ref}: no layer with blob or TOC digest {digest}")
        if not img.all_started:
            # The first lookup of an image starts resolving all its layers.
            img.all_started = True
            if self._on_image is not None:
                # E.g. the prefetch profile lookup, concurrent with the TOC fetches.
                self._on_image(img)
            for i in range(len(img.manifest.layers)):
                self._future(img, i)
        layer = await asyncio.shield(self._future(img, pos))
        if digest == layer.blob_digest and not layer.info_old:
            raise NotLazyError(
                f"{ref} {digest}: uncompressed size unknown and unknown_diff_size = fallback"
            )
        return layer

    def _future(self, img: Image, pos: int) -> Awaitable[Layer]:
        """The singleflight resolution of layer ``pos`` of ``img`` (no await inside)."""
        key = (img.ref, img.manifest.layers[pos].digest)
        loop = asyncio.get_running_loop()
        layer = self._layers.get(key)
        if layer is not None:
            fut: asyncio.Future[Layer] = loop.create_future()
            fut.set_result(layer)
            return fut
        task = self._flights.get(key)
        if task is not None:
            return task
        failed = self._negative.get(key)
        if failed is not None:
            fut = loop.create_future()
            fut.set_exception(failed)
            return fut
        return self._flights.start(
            key, lambda: self._resolve_layer(img, pos), on_result=self._adopt
        )

    async def _resolve_layer(self, img: Image, pos: int) -> Layer:
        desc = img.manifest.layers[pos]
        try:
            layer = await self._load_layer(img, pos)
            if layer is not None:
                return layer
            self._stats.layer_resolves += 1
            layer = await self._fetch_layer(img, pos)
        except NotLazyError as exc:
            log.debug("%s %s: not lazy: %s", img.ref, desc.digest, exc)
            raise
        except AlsdError as exc:
            self._stats.layer_errors += 1
            log.warning("%s %s: cannot serve this layer lazily: %s", img.ref, desc.digest, exc)
            raise
        except Exception as exc:
            self._stats.layer_errors += 1
            log.exception("%s %s: unexpected error resolving the layer", img.ref, desc.digest)
            raise RegistryError(f"{img.ref} {desc.digest}: resolving failed: {exc!r}") from exc
        await self._records.save_layer(layer)
        return layer

    async def _load_layer(self, img: Image, pos: int) -> Layer | None:
        stored = await self._records.load_layer(img, pos)
        if stored is None:
            return None
        try:
            layer = self._make_layer(
                img, pos, stored.index, stored.uncompressed_size, toc_digest=stored.toc_digest
            )
        except AlsdError as exc:
            await self._records.discard_layer(
                layer_key(img.ref, img.manifest.layers[pos].digest), exc
            )
            return None
        layer.from_metadata = True
        self._stats.layers_from_metadata += 1
        return layer

    async def _fetch_layer(self, img: Image, pos: int) -> Layer:
        desc = img.manifest.layers[pos]
        reference = parse_reference(img.ref)

        reads_ms: list[float] = []

        async def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            t = time.monotonic()
            try:
                return await self._resolve_read(reference, desc.digest, ranges)
            finally:
                reads_ms.append((time.monotonic() - t) * 1e3)

        t0 = time.monotonic()
        toc = await tocplan.read_layer_index(
            read,
            name=f"{img.ref} {desc.digest}",
            blob_size=desc.size,
            annotations=desc.annotations,
            media_type=desc.media_type,
            max_toc_bytes=self._settings.max_toc_bytes,
            max_chunk_bytes=self._settings.max_chunk_bytes,
        )
        if log.isEnabledFor(logging.DEBUG):
            total = (time.monotonic() - t0) * 1e3
            log.debug(
                "resolved layer %s@%s: %.1f ms: reads (tail, TOC) %s ms, parsing %.1f ms",
                img.ref, desc.digest, total, " + ".join(f"{x:.1f}" for x in reads_ms),
                total - sum(reads_ms),
            )  # fmt: skip
        return self._make_layer(img, pos, toc.index, toc.uncompressed_size)

    async def _resolve_read(
        self, reference: Reference, digest: str, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        self._stats.resolve_requests += 1
        bodies = await self._registry.read_ranges(reference, digest, ranges, counter=self._counter)
        if not bodies_fit(bodies, ranges):
            raise RegistryError(f"{reference} {digest}: short range read for {list(ranges)}")
        self._stats.resolve_bytes += sum(len(b) for b in bodies)
        return bodies

    def _make_layer(
        self,
        img: Image,
        pos: int,
        index: LayerIndex,
        unc: int | None,
        *,
        toc_digest: str | None = None,
    ) -> Layer:
        desc = img.manifest.layers[pos]
        diff_id = img.config.diff_ids[pos]
        toc = toc_digest or toc_digest_annotation(desc.annotations) or index.toc_digest
        compression = info.compression_for(str(index.format))
        unknown_diff_size = self._settings.unknown_diff_size
        try:
            old: bytes = b""
            if unc is not None or unknown_diff_size != "fallback":
                # old_diff_size logs, once per layer, that podman save will fail on 0.
                old = info.info_old(
                    blob_digest=desc.digest,
                    blob_size=desc.size,
                    diff_id=diff_id,
                    diff_size=info.old_diff_size(
                        unc, unknown_diff_size, ref=img.ref, blob_digest=desc.digest
                    ),
                    compression=compression,
                )
            new = info.info_new(
                toc_digest=toc,
                blob_digest=desc.digest,
                blob_size=desc.size,
                diff_id=diff_id,
                diff_size=unc,
                compression=compression,
            )
        except ValueError as exc:
            raise FormatError(f"{img.ref} {desc.digest}: cannot describe the layer: {exc}") from exc
        source = BlobSource(
            name=f"{img.ref}@{desc.digest}",
            ref=parse_reference(img.ref),
            blob_digest=desc.digest,
            format=index.format,
            blob_size=desc.size,
            path_of=index.path,
            counter=ByteCounter(parent=self._counter),
        )
        return Layer(
            ref=img.ref,
            blob_digest=desc.digest,
            toc_digest=toc,
            index=index,
            layer_no=next(self._layer_numbers),
            info_old=old,
            info_new=new,
            diff_id=diff_id,
            compressed_size=desc.size,
            uncompressed_size=unc,
            position=pos,
            source=source,
            image_digest=img.digest,
        )
