"""The layer engine: which layers exist, what is fetched, when, and from where.

Sits between the filesystem (tree/fuse_ops) and the registry client. It

* resolves ``(reference, digest)`` to a :class:`Layer`: image manifest + config (cached and
  deduplicated per reference), the layer whose blob digest (podman <= 5.0) or TOC digest
  (podman >= 5.1) is asked for, its footer and verified TOC; all layers of an image are
  resolved concurrently as soon as one is asked for (spec.md §2.3); failures are cached
  for ``negative_cache_ttl_s`` per (reference, digest) and, when the image itself cannot
  be resolved, per reference (podman 4.3 asks about every layer of a pull in turn: one
  unreachable registry must cost one resolution, not one per layer); a lookup never waits
  longer than ``resolve_timeout_s``, and once one lookup of an image timed out, the
  others answer at once until that resolution ends;
* serves file reads through the :class:`~alsd.fetcher.Fetcher` (chunk store first, then
  coalesced, verified range reads) and raw blob reads for the ``blob`` file; a read that
  has to go to the registry also reads ahead: the ``readahead_bytes`` of the blob that
  follow it are fetched in a request of their own (files next to each other in a layer
  tend to be read together: a package's modules, a library and its data);
* starts the landmark prefetch and the background fetch of each resolved layer
  (:mod:`alsd.scheduler` keeps on-demand reads first);
* counts use/release and drops a layer from memory ``release_grace_s`` after its count
  fell to zero (its chunks stay in the chunk store);
* persists images and layers through the metadata store, so that after a restart a known
  layer is answered without a single registry request.

Concurrency rule: everything runs on the event loop thread. Resolutions are singleflight
tasks keyed by reference (images) and by ``(reference, blob digest)`` (layers); they are
detached from the FUSE request that started them (``asyncio.shield``), so a timed-out or
interrupted lookup does not abort a resolution another lookup is waiting for. See
developer-notes/concurrency.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from alsd import info
from alsd.errors import (
    AlsdError,
    FormatError,
    IntegrityError,
    NotLazyError,
    RegistryError,
    StoreError,
    Transient,
    UnknownLayer,
)
from alsd.fetcher import BlobSource, ByteStats, ChunkStoreLike, Fetcher
from alsd.oci import formats
from alsd.oci.layer_index import Chunk, EntryKind, LayerIndex
from alsd.oci.manifest import (
    Descriptor,
    ImageConfig,
    Manifest,
    parse_config,
    parse_manifest,
)
from alsd.oci.ranges import bodies_fit
from alsd.oci.reference import Reference, parse_reference
from alsd.registry import ByteCounter
from alsd.scheduler import Priority, Scheduler

log = logging.getLogger(__name__)

# containers/image computes the TOC digest from these annotations, in this order
# (c/storage pkg/chunked/toc/toc.go GetTOCDigest).
ANNOTATION_ESTARGZ_TOC = "containerd.io/snapshot/stargz/toc.digest"
ANNOTATION_ZSTD_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"

_RECORD_VERSION = 1


@dataclass(frozen=True)
class EngineSettings:
    """Everything the engine can be told; alsd.toml is mapped onto this (config.py).

    Settings of the registry client, the chunk store and the daemon (request timeout,
    retries, cache size, registries.conf, auth file, state directory) are not here: those
    parts are built from the configuration directly (registry_setup.py, daemon.py).
    """

    fetch_concurrency: int = 4
    resolve_timeout_s: float = 30.0
    merge_gap_bytes: int = 64 << 10
    readahead_bytes: int = 512 << 10
    max_request_bytes: int = 8 << 20
    max_ranges_per_request: int = 16
    prefetch_landmark: bool = True
    prefetch_background: bool = True
    background_max_layer_bytes: int | None = None
    background_batch_bytes: int = 4 << 20
    background_concurrency: int = 1
    quiet_period_s: float = 2.0
    release_grace_s: float = 120.0
    negative_cache_ttl_s: float = 60.0
    unknown_diff_size: Literal["lazy-zero", "fallback"] = "lazy-zero"
    max_toc_bytes: int = 64 << 20
    blob_readahead_bytes: int = 1 << 20
    # Landmark prefetch requests are at most this large: a request's chunks are decoded
    # and served only once its whole body has arrived, and the prioritised region is in
    # the order the container reads it, so small requests let it start early.
    prefetch_request_bytes: int = 1 << 20


class RegistryLike(Protocol):
    """The part of alsd.registry.RegistryClient the engine uses."""

    async def resolve(self, ref: Reference, *, counter: Any = None) -> Any: ...

    async def read_ranges(
        self, ref: Any, digest: str, ranges: Sequence[tuple[int, int]], *, counter: Any = None
    ) -> list[bytes]: ...


class MetadataLike(Protocol):
    """The part of alsd.metadata.MetadataStore the engine uses."""

    async def save_async(self, kind: str, key: str, obj: Any) -> None: ...

    async def load_async(self, kind: str, key: str) -> Any | None: ...

    async def list_async(self, kind: str) -> list[tuple[str, Any]]: ...

    async def delete_async(self, kind: str, key: str) -> bool: ...


def toc_digest_annotation(desc: Descriptor) -> str | None:
    """The TOC digest as containers/image (>= 5.31) computes it from a layer descriptor."""
    ann = desc.annotations
    return ann.get(ANNOTATION_ESTARGZ_TOC) or ann.get(ANNOTATION_ZSTD_CHECKSUM) or None


@dataclass(eq=False)
class Layer:
    """A resolved lazily pullable layer (one per (reference, blob digest) while in memory)."""

    ref: str
    blob_digest: str
    toc_digest: str
    index: LayerIndex
    layer_no: int  # inode namespace, unique over the engine's lifetime
    info_old: bytes  # b"" when this generation cannot be served (see info.py)
    info_new: bytes
    diff_id: str
    compressed_size: int
    uncompressed_size: int | None
    position: int  # index of the layer in the manifest
    source: BlobSource
    use_count: int = 0
    prefetch_state: str = "pending"
    background_state: str = "pending"
    from_metadata: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)
    _drop_handle: asyncio.TimerHandle | None = field(default=None, repr=False)
    _blob_cache: tuple[int, bytes] | None = field(default=None, repr=False)

    @property
    def format(self) -> str:
        return str(self.index.format)

    @property
    def stats(self) -> ByteStats:
        return self.source.stats

    @property
    def key(self) -> tuple[str, str]:
        return (self.ref, self.blob_digest)


@dataclass
class _Image:
    ref: str
    manifest_bytes: bytes
    config_bytes: bytes
    manifest: Manifest
    config: ImageConfig
    resolved_at: float  # wall clock (time.time()), survives restarts
    all_started: bool = False

    def position_of(self, digest: str) -> int | None:
        for i, d in enumerate(self.manifest.layers):
            if d.digest == digest:
                return i
        for i, d in enumerate(self.manifest.layers):
            if toc_digest_annotation(d) == digest:
                return i
        return None


@dataclass
class EngineStats:
    image_resolves: int = 0
    image_errors: int = 0
    layer_resolves: int = 0
    layer_errors: int = 0
    layers_from_metadata: int = 0
    negative_hits: int = 0
    resolve_timeouts: int = 0
    resolve_requests: int = 0  # range reads for footers/TOCs/tar-splits
    resolve_bytes: int = 0
    blob_requests: int = 0
    blob_bytes: int = 0
    reads: int = 0
    read_bytes: int = 0
    read_errors: int = 0
    read_latency_sum_s: float = 0.0
    readahead_requests: int = 0  # read-ahead fetches started (each one request or fewer)
    readahead_errors: int = 0
    metadata_discarded: int = 0


def _image_record(img: _Image) -> dict[str, Any]:
    return {
        "v": _RECORD_VERSION,
        "ref": img.ref,
        "manifest": img.manifest_bytes,
        "config": img.config_bytes,
        "resolved_at": img.resolved_at,
    }


def _layer_key(ref: str, blob_digest: str) -> str:
    return f"{ref}@@{blob_digest}"


class Engine:
    """See the module docstring."""

    def __init__(
        self,
        registry: RegistryLike,
        chunkstore: ChunkStoreLike,
        metadata: MetadataLike | None,
        settings: EngineSettings | None = None,
    ) -> None:
        self.settings = settings or EngineSettings()
        s = self.settings
        self._registry = registry
        self._store = chunkstore
        self._metadata = metadata
        self.scheduler = Scheduler(
            s.fetch_concurrency,
            quiet_period_s=s.quiet_period_s,
            background_concurrency=s.background_concurrency,
        )
        self.fetcher = Fetcher(
            registry,
            chunkstore,
            self.scheduler,
            merge_gap_bytes=s.merge_gap_bytes,
            max_request_bytes=s.max_request_bytes,
            max_ranges_per_request=s.max_ranges_per_request,
        )
        self.stats = EngineStats()
        # Every registry request the engine causes is counted here (children per layer).
        self.registry_counter = ByteCounter()
        self._images: dict[str, _Image] = {}
        self._image_tasks: dict[str, asyncio.Task[_Image]] = {}
        self._layers: dict[tuple[str, str], Layer] = {}
        self._layer_tasks: dict[tuple[str, str], asyncio.Task[Layer]] = {}
        # Keys (ref, digest) for layers, (ref, "") for images that could not be resolved.
        self._negative: dict[tuple[str, str], tuple[AlsdError, float]] = {}
        # References whose resolution outlived a lookup's resolve_timeout_s and still runs.
        self._slow_images: set[str] = set()
        self._layer_numbers = itertools.count(1)
        self._closed = False

    # ================================================================ lifecycle

    async def load_state(self) -> None:
        """Load persisted images; layers are loaded from metadata when first asked for."""
        if self._metadata is None:
            return
        for key, rec in await self._metadata.list_async("image"):
            try:
                if not isinstance(rec, dict):
                    raise TypeError("image record is not a map")
                img = self._image_from_record(rec)
            except (AlsdError, KeyError, TypeError, ValueError) as exc:
                log.warning("discarding stored image %r: %s", key, exc)
                self.stats.metadata_discarded += 1
                await self._metadata.delete_async("image", key)
                continue
            self._images.setdefault(img.ref, img)
        log.info("loaded %d image(s) from metadata", len(self._images))

    async def close(self) -> None:
        """Stop every task of the engine (resolutions, prefetch, background, fetches)."""
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [*self._image_tasks.values(), *self._layer_tasks.values()]
        for layer in self._layers.values():
            tasks.extend(layer._tasks)
            if layer._drop_handle is not None:
                layer._drop_handle.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.fetcher.close()

    # ================================================================ lookup

    async def get_layer(self, ref: str, digest: str) -> Layer:
        """The layer of image ``ref`` whose blob or TOC digest is ``digest``.

        Raises UnknownLayer, NotLazyError, FormatError, IntegrityError or RegistryError
        (Transient after ``resolve_timeout_s``).
        """
        if self._closed:
            raise UnknownLayer("engine is closed")
        key = (ref, digest)
        self._check_negative(key)
        try:
            async with asyncio.timeout(self.settings.resolve_timeout_s):
                layer = await self._get_layer(ref, digest)
        except TimeoutError:
            self.stats.resolve_timeouts += 1
            if ref in self._image_tasks:
                # The registry is slow or silent: the next layers of this pull should not
                # wait resolve_timeout_s each (see _get_image).
                self._slow_images.add(ref)
            # Not cached: the resolution goes on and a later lookup may find it done.
            raise Transient(
                f"{ref} {digest}: not resolved within {self.settings.resolve_timeout_s} s"
            ) from None
        except AlsdError as exc:
            self._remember_failure(key, exc)
            raise
        if layer.use_count == 0:
            self._arm_drop(layer)
        return layer

    async def _get_layer(self, ref: str, digest: str) -> Layer:
        img = await self._get_image(ref)
        pos = img.position_of(digest)
        if pos is None and time.time() - img.resolved_at > self.settings.negative_cache_ttl_s:
            # The tag may have moved since we resolved it: look once more.
            img = await self._get_image(ref, refresh=True)
            pos = img.position_of(digest)
        if pos is None:
            raise UnknownLayer(f"{ref}: no layer with blob or TOC digest {digest}")
        if not img.all_started:
            # spec.md §2.3: the first lookup of an image starts resolving all its layers.
            img.all_started = True
            for i in range(len(img.manifest.layers)):
                self._layer_future(img, i)
        layer = await asyncio.shield(self._layer_future(img, pos))
        if digest == layer.blob_digest and not layer.info_old:
            raise NotLazyError(
                f"{ref} {digest}: uncompressed size unknown and unknown_diff_size = fallback"
            )
        return layer

    def _check_negative(self, key: tuple[str, str]) -> None:
        hit = self._negative.get(key)
        if hit is None:
            return
        exc, expires = hit
        if time.monotonic() >= expires:
            del self._negative[key]
            return
        self.stats.negative_hits += 1
        raise _fresh(exc)

    def _remember_failure(self, key: tuple[str, str], exc: AlsdError) -> None:
        ttl = self.settings.negative_cache_ttl_s
        if ttl <= 0:
            return
        now = time.monotonic()
        if len(self._negative) > 10_000:
            self._negative = {k: v for k, v in self._negative.items() if v[1] > now}
        self._negative[key] = (exc, now + ttl)

    # ---------------------------------------------------------------- images

    async def _get_image(self, ref: str, *, refresh: bool = False) -> _Image:
        img = self._images.get(ref)
        if img is not None and not refresh:
            return img
        task = self._image_tasks.get(ref)
        if img is None:
            # A known image is still served while a refresh fails; an unknown one is not
            # asked for again until its failure expires.
            self._check_negative((ref, ""))
            if task is not None and ref in self._slow_images:
                self.stats.negative_hits += 1
                raise Transient(f"{ref}: still resolving after a lookup timed out")
        if task is None:
            task = asyncio.get_running_loop().create_task(self._resolve_image(ref))
            self._image_tasks[ref] = task

            def done(t: asyncio.Task[_Image], ref: str = ref) -> None:
                if self._image_tasks.get(ref) is t:
                    del self._image_tasks[ref]
                    self._slow_images.discard(ref)
                if not t.cancelled():
                    exc = t.exception()  # retrieved: the awaiting lookups report it
                    if isinstance(exc, AlsdError):
                        self._remember_failure((ref, ""), exc)

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _resolve_image(self, ref: str) -> _Image:
        try:
            reference = parse_reference(ref)
        except AlsdError as exc:
            raise UnknownLayer(f"{ref!r} is not a valid image reference: {exc}") from None
        self.stats.image_resolves += 1
        try:
            resolved = await self._registry.resolve(reference, counter=self.registry_counter)
            manifest_bytes, config_bytes = _resolved_bytes(resolved)
            img = self._make_image(ref, manifest_bytes, config_bytes, time.time())
        except AlsdError as exc:
            self.stats.image_errors += 1
            # Once per failed resolution (the failure is then cached per reference).
            log.warning(
                "%s: cannot resolve the image, its layers are pulled normally: %s", ref, exc
            )
            raise
        except Exception as exc:
            self.stats.image_errors += 1
            log.exception("%s: unexpected error resolving the image", ref)
            raise RegistryError(f"{ref}: resolving the image failed: {exc!r}") from exc
        old = self._images.get(ref)
        self._images[ref] = img
        if old is not None and old.manifest_bytes == manifest_bytes:
            img.all_started = old.all_started
        await self._save("image", ref, _image_record(img))
        return img

    @staticmethod
    def _make_image(ref: str, manifest_bytes: bytes, config_bytes: bytes, at: float) -> _Image:
        manifest = parse_manifest(manifest_bytes)
        if not isinstance(manifest, Manifest):
            raise FormatError(f"{ref}: the resolved manifest is an index, not an image manifest")
        config = parse_config(config_bytes)
        if len(config.diff_ids) != len(manifest.layers):
            raise FormatError(
                f"{ref}: {len(manifest.layers)} layers but {len(config.diff_ids)} diff_ids"
            )
        return _Image(ref, manifest_bytes, config_bytes, manifest, config, at)

    def _image_from_record(self, rec: Mapping[str, Any]) -> _Image:
        if rec.get("v") != _RECORD_VERSION:
            raise ValueError(f"record version {rec.get('v')!r}")
        ref, m, c, at = rec["ref"], rec["manifest"], rec["config"], rec["resolved_at"]
        if not (isinstance(ref, str) and isinstance(m, bytes) and isinstance(c, bytes)):
            raise TypeError("malformed image record")
        return self._make_image(ref, m, c, float(at))

    # ---------------------------------------------------------------- layers

    def _layer_future(self, img: _Image, pos: int) -> Awaitable[Layer]:
        """The singleflight resolution of layer ``pos`` of ``img`` (no await inside)."""
        desc = img.manifest.layers[pos]
        key = (img.ref, desc.digest)
        layer = self._layers.get(key)
        loop = asyncio.get_running_loop()
        if layer is not None:
            fut: asyncio.Future[Layer] = loop.create_future()
            fut.set_result(layer)
            return fut
        task = self._layer_tasks.get(key)
        if task is not None:
            return task
        hit = self._negative.get(key)
        if hit is not None and time.monotonic() < hit[1]:
            fut = loop.create_future()
            fut.set_exception(_fresh(hit[0]))
            return fut
        task = loop.create_task(self._resolve_layer(img, pos))
        self._layer_tasks[key] = task

        def done(t: asyncio.Task[Layer]) -> None:
            if self._layer_tasks.get(key) is t:
                del self._layer_tasks[key]
            if t.cancelled():
                return
            exc = t.exception()
            if exc is None:
                self._adopt(t.result())
            elif isinstance(exc, AlsdError):
                self._remember_failure(key, exc)

        task.add_done_callback(done)
        return task

    async def _resolve_layer(self, img: _Image, pos: int) -> Layer:
        desc = img.manifest.layers[pos]
        try:
            layer = await self._load_layer(img, pos)
            if layer is not None:
                return layer
            self.stats.layer_resolves += 1
            layer = await self._fetch_layer(img, pos)
        except NotLazyError as exc:
            log.debug("%s %s: not lazy: %s", img.ref, desc.digest, exc)
            raise
        except AlsdError as exc:
            self.stats.layer_errors += 1
            log.warning("%s %s: cannot serve this layer lazily: %s", img.ref, desc.digest, exc)
            raise
        except Exception as exc:
            self.stats.layer_errors += 1
            log.exception("%s %s: unexpected error resolving the layer", img.ref, desc.digest)
            raise RegistryError(f"{img.ref} {desc.digest}: resolving failed: {exc!r}") from exc
        await self._save("layer", _layer_key(img.ref, desc.digest), self._layer_record(layer))
        return layer

    async def _fetch_layer(self, img: _Image, pos: int) -> Layer:
        desc = img.manifest.layers[pos]
        reference = parse_reference(img.ref)
        ann = desc.annotations
        size = desc.size
        if size <= 0:
            raise FormatError(f"{img.ref} {desc.digest}: descriptor size {size}")
        tail_start = max(0, size - formats.TAIL_SIZE)
        (tail,) = await self._resolve_read(reference, desc.digest, [(tail_start, size)])
        loc = formats.detect(tail, size, ann, desc.media_type)
        if loc.length > self.settings.max_toc_bytes:
            raise FormatError(
                f"{img.ref} {desc.digest}: TOC of {loc.length} bytes exceeds max_toc_bytes"
            )
        unc = formats.uncompressed_size_from_annotations(ann)
        ranges: list[tuple[int, int]] = []
        toc_range = (loc.offset, loc.offset + loc.length)
        toc_bytes: bytes | None = None
        if toc_range[0] >= tail_start and toc_range[1] <= size:
            # Small layers: the TOC already came with the tail.
            toc_bytes = tail[toc_range[0] - tail_start : toc_range[1] - tail_start]
        else:
            ranges.append(toc_range)
        want_tarsplit = unc is None and loc.tarsplit is not None
        if want_tarsplit:
            assert loc.tarsplit is not None
            ts_off, ts_len = loc.tarsplit
            if ts_len > self.settings.max_toc_bytes:
                want_tarsplit = False
            else:
                ranges.append((ts_off, ts_off + ts_len))
        bodies = await self._resolve_read(reference, desc.digest, ranges) if ranges else []
        if toc_bytes is None:
            toc_bytes = bodies.pop(0)
        max_toc = self.settings.max_toc_bytes
        index = await asyncio.to_thread(
            lambda: formats.parse_toc(loc, toc_bytes, size, ann, max_toc_bytes=max_toc)
        )
        if want_tarsplit:
            ts = bodies.pop(0)
            unc = await asyncio.to_thread(formats.tarsplit_uncompressed_size, ts)
        return self._make_layer(img, pos, index, unc)

    async def _resolve_read(
        self, reference: Reference, digest: str, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        self.stats.resolve_requests += 1
        bodies = await self._registry.read_ranges(
            reference, digest, ranges, counter=self.registry_counter
        )
        if not bodies_fit(bodies, ranges):
            raise RegistryError(f"{reference} {digest}: short range read for {list(ranges)}")
        self.stats.resolve_bytes += sum(len(b) for b in bodies)
        return bodies

    def _make_layer(
        self,
        img: _Image,
        pos: int,
        index: LayerIndex,
        unc: int | None,
        *,
        toc_digest: str | None = None,
    ) -> Layer:
        desc = img.manifest.layers[pos]
        diff_id = img.config.diff_ids[pos]
        toc = toc_digest or toc_digest_annotation(desc) or index.toc_digest
        compression = info.compression_for(str(index.format))
        try:
            old: bytes = b""
            if unc is not None or self.settings.unknown_diff_size != "fallback":
                # old_diff_size logs, once per layer, that podman save will fail on 0.
                old = info.info_old(
                    blob_digest=desc.digest,
                    blob_size=desc.size,
                    diff_id=diff_id,
                    diff_size=info.old_diff_size(
                        unc,
                        self.settings.unknown_diff_size,
                        ref=img.ref,
                        blob_digest=desc.digest,
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
            counter=ByteCounter(parent=self.registry_counter),
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
        )

    def _layer_record(self, layer: Layer) -> dict[str, Any]:
        return {
            "v": _RECORD_VERSION,
            "ref": layer.ref,
            "blob_digest": layer.blob_digest,
            "toc_digest": layer.toc_digest,
            "diff_id": layer.diff_id,
            "position": layer.position,
            "compressed_size": layer.compressed_size,
            "uncompressed_size": layer.uncompressed_size,
            "index": layer.index.to_state(),
        }

    async def _load_layer(self, img: _Image, pos: int) -> Layer | None:
        if self._metadata is None:
            return None
        desc = img.manifest.layers[pos]
        key = _layer_key(img.ref, desc.digest)
        rec = await self._metadata.load_async("layer", key)
        if rec is None:
            return None
        try:
            if not isinstance(rec, dict):
                raise TypeError("layer record is not a map")
            if rec.get("v") != _RECORD_VERSION:
                raise ValueError(f"record version {rec.get('v')!r}")
            if (
                rec["ref"] != img.ref
                or rec["blob_digest"] != desc.digest
                or rec["position"] != pos
                or rec["diff_id"] != img.config.diff_ids[pos]
                or rec["compressed_size"] != desc.size
            ):
                raise ValueError("record does not match the image manifest")
            unc = rec["uncompressed_size"]
            if unc is not None and not isinstance(unc, int):
                raise TypeError("uncompressed_size")
            index = LayerIndex.from_state(rec["index"])
            if index.blob_size != desc.size:
                raise ValueError("index blob size does not match the descriptor")
            toc = rec["toc_digest"]
            if not isinstance(toc, str):
                raise TypeError("toc_digest")
            layer = self._make_layer(img, pos, index, unc, toc_digest=toc)
        except (AlsdError, KeyError, TypeError, ValueError, IndexError) as exc:
            log.warning("discarding stored layer %s: %s; resolving it afresh", key, exc)
            self.stats.metadata_discarded += 1
            await self._metadata.delete_async("layer", key)
            return None
        layer.from_metadata = True
        self.stats.layers_from_metadata += 1
        return layer

    async def _save(self, kind: str, key: str, record: Mapping[str, Any]) -> None:
        if self._metadata is None:
            return
        try:
            await self._metadata.save_async(kind, key, record)
        except AlsdError as exc:
            # Losing persistence costs a re-resolution after a restart, nothing more.
            log.warning("could not persist %s %s: %s", kind, key, exc)

    def _adopt(self, layer: Layer) -> None:
        """A resolution finished: keep the layer and start its prefetch/background."""
        if self._closed or layer.key in self._layers:
            return
        self._layers[layer.key] = layer
        loop = asyncio.get_running_loop()
        prefetch = loop.create_task(self._prefetch(layer))
        layer._tasks.append(prefetch)
        layer._tasks.append(loop.create_task(self._background(layer, prefetch)))
        self._arm_drop(layer)

    # ================================================================ use / release

    def use(self, layer: Layer) -> None:
        layer.use_count += 1
        if layer._drop_handle is not None:
            layer._drop_handle.cancel()
            layer._drop_handle = None
        if layer.key not in self._layers and not self._closed:
            # Dropped while the filesystem still held it: take it back (and resume fetching).
            self._adopt(layer)

    def release(self, layer: Layer) -> None:
        if layer.use_count <= 0:
            # Normal after a restart: podman's counts were not persisted (spec.md §1.5).
            log.debug("release of %s without a use", layer.source.name)
            return
        layer.use_count -= 1
        if layer.use_count == 0:
            self._arm_drop(layer)

    def _arm_drop(self, layer: Layer) -> None:
        if layer._drop_handle is not None:
            layer._drop_handle.cancel()
        layer._drop_handle = asyncio.get_running_loop().call_later(
            self.settings.release_grace_s, self._drop, layer
        )

    def _drop(self, layer: Layer) -> None:
        layer._drop_handle = None
        if layer.use_count > 0:
            return
        if self._layers.get(layer.key) is layer:
            del self._layers[layer.key]
        for t in layer._tasks:
            t.cancel()
        layer._tasks.clear()
        layer._blob_cache = None
        if layer.prefetch_state in ("pending", "running"):
            layer.prefetch_state = "cancelled"
        if layer.background_state in ("pending", "waiting", "running"):
            layer.background_state = "cancelled"
        log.debug("dropped %s from memory", layer.source.name)

    # ================================================================ reads

    async def read(self, layer: Layer, node: int, offset: int, size: int) -> bytes:
        """Exactly the bytes ``[offset, offset+size)`` of file ``node`` (short at EOF)."""
        attr = layer.index.attr(node)
        if attr.kind != EntryKind.REG or size <= 0 or offset < 0 or offset >= attr.size:
            return b""
        end = min(attr.size, offset + size)
        chunks = layer.index.chunks_in_range(node, offset, end - offset)
        self.stats.reads += 1
        t0 = time.monotonic()
        try:
            out = await self._read_stored(layer, node, chunks, offset, end)
            if out is None:
                with self.scheduler.demand():
                    fetch = self.fetcher.get_chunks(
                        layer.source, [(node, c) for c in chunks], Priority.DEMAND
                    )
                    # The read-ahead task runs after this read has registered its chunks
                    # and before the fetcher flushes them: both requests go out together.
                    self._read_ahead(layer, chunks)
                    got = await fetch
                out = _assemble(layer, node, chunks, got, offset, end)
        except AlsdError:
            self.stats.read_errors += 1
            raise
        finally:
            self.stats.read_latency_sum_s += time.monotonic() - t0
        self.stats.read_bytes += len(out)
        layer.source.stats.bytes_served += len(out)
        return out

    def _read_ahead(self, layer: Layer, chunks: Sequence[Chunk]) -> None:
        """Start fetching the ``readahead_bytes`` of the blob that follow ``chunks``.

        Called when a read misses the store; the chunks that follow in the blob belong to
        the next files of the layer (tar order), which a starting program tends to read
        next (Python's modules, a library's neighbours). They are fetched in a request of
        their own, at prefetch priority, so the read that missed is not delayed by them;
        a later read of one of them joins the fetch in flight. Not while the landmark
        prefetch is still fetching the region the read is in: those chunks come anyway.
        Errors only cost the read-ahead (the chunks are fetched again when read).
        """
        n = self.settings.readahead_bytes
        if n <= 0 or not chunks or self._closed:
            return
        end = max(c.fetch_end for c in chunks)
        idx = layer.index
        if layer.prefetch_state in ("pending", "running") and end <= idx.prefetch_end:
            return
        limit = end + n
        ahead: list[tuple[int, Chunk]] = []
        for node, c in idx.iter_chunks(end):
            if c.fetch_end > limit:
                break
            if not c.zeros and not self._store.has(c.digest):
                ahead.append((node, c))
        if not ahead:
            return
        self.stats.readahead_requests += 1
        task = asyncio.get_running_loop().create_task(self._fetch_ahead(layer, ahead))
        layer._tasks.append(task)
        task.add_done_callback(lambda t: _discard(layer._tasks, t))

    async def _fetch_ahead(self, layer: Layer, ahead: list[tuple[int, Chunk]]) -> None:
        n = self.settings.readahead_bytes
        try:
            await self.fetcher.get_chunks(
                layer.source, ahead, Priority.PREFETCH, keep=False,
                merge_gap_bytes=n, max_request_bytes=n,
            )  # fmt: skip
        except AlsdError as exc:
            # The fetcher logged it; a later read fetches those chunks itself.
            self.stats.readahead_errors += 1
            log.debug("%s: read-ahead failed: %s", layer.source.name, exc)

    async def _read_stored(
        self, layer: Layer, node: int, chunks: Sequence[Chunk], offset: int, end: int
    ) -> bytes | None:
        """``[offset, end)`` when every chunk is in the chunk store, reading only the
        requested slice of each; None otherwise. Does not count as on-demand activity for
        the scheduler: nothing is fetched."""
        wanted: list[tuple[Chunk, int, int]] = []
        pos = offset
        for c in chunks:
            c_end = c.file_offset + c.size
            if c_end <= pos:
                continue
            if c.file_offset > pos:
                return None  # a hole in the chunk list: let _assemble report it
            hi = min(end, c_end)
            wanted.append((c, pos - c.file_offset, hi - c.file_offset))
            pos = hi
            if pos >= end:
                break
        if pos != end:
            return None
        parts = await self.fetcher.get_stored_slices(wanted)
        if parts is None:
            return None
        last, lo, _ = wanted[-1]
        if lo == 0:
            # Reading a chunk from its start: a sequential reader will want the file's
            # next chunk soon, so let the disk fetch it meanwhile.
            self.fetcher.advise_next(layer.index.chunks(node), last)
        for (c, lo, hi), part in zip(wanted, parts, strict=True):
            if len(part) != hi - lo:
                # A stored chunk shorter than the TOC says: same error as the general path.
                raise IntegrityError(
                    f"{layer.source.name}: {layer.index.path(node)}@{c.file_offset}: chunk "
                    f"has fewer bytes than the TOC says ({c.size})"
                )
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_blob(self, layer: Layer, offset: int, size: int) -> bytes:
        """Raw compressed bytes of the layer blob (for the ``blob`` file)."""
        total = layer.compressed_size
        if size <= 0 or offset < 0 or offset >= total:
            return b""
        end = min(total, offset + size)
        cached = layer._blob_cache
        if cached is not None and cached[0] <= offset and end <= cached[0] + len(cached[1]):
            start = offset - cached[0]
            return cached[1][start : start + end - offset]
        # Exports read sequentially in small pieces: fetch ahead and keep the last piece.
        fetch_end = min(total, max(end, offset + self.settings.blob_readahead_bytes))
        with self.scheduler.demand():
            async with self.scheduler.slot(Priority.DEMAND):
                self.stats.blob_requests += 1
                (body,) = await self._registry.read_ranges(
                    layer.source.ref,
                    layer.blob_digest,
                    [(offset, fetch_end)],
                    counter=layer.source.counter,
                )
        if len(body) != fetch_end - offset:
            raise RegistryError(f"{layer.source.name}: short blob read at {offset}")
        self.stats.blob_bytes += len(body)
        layer.source.stats.bytes_fetched += len(body)
        layer._blob_cache = (offset, body)
        return body[: end - offset]

    # ================================================================ prefetch / background

    async def _prefetch(self, layer: Layer) -> None:
        idx = layer.index
        if not self.settings.prefetch_landmark:
            layer.prefetch_state = "disabled"
            return
        if idx.prefetch != "landmark" or idx.prefetch_end <= 0:
            layer.prefetch_state = "no landmark" if idx.prefetch is None else "disabled by landmark"
            return
        layer.prefetch_state = "running"
        end = idx.prefetch_end
        try:
            with self.scheduler.prefetching():
                await self._warm(
                    layer,
                    _take_while(idx.iter_chunks(), lambda c: c.blob_offset < end),
                    Priority.PREFETCH,
                    # The region is fetched whole, in prefetch_request_bytes pieces.
                    merge_gap_bytes=end,
                    span_bytes=self.settings.max_request_bytes * self.settings.fetch_concurrency,
                    max_request_bytes=self.settings.prefetch_request_bytes,
                )
        except AlsdError as exc:
            layer.prefetch_state = f"failed: {exc}"
            log.warning("%s: prefetch failed: %s", layer.source.name, exc)
            return
        layer.prefetch_state = "done"

    async def _background(self, layer: Layer, prefetch: asyncio.Task[None]) -> None:
        s = self.settings
        if not s.prefetch_background:
            layer.background_state = "disabled"
            return
        if s.background_max_layer_bytes is not None and (
            layer.compressed_size > s.background_max_layer_bytes
        ):
            layer.background_state = "skipped: layer too large"
            return
        await asyncio.wait([prefetch])
        layer.background_state = "waiting"
        try:
            async with self.scheduler.background():
                layer.background_state = "running"
                await self._warm(
                    layer,
                    layer.index.iter_chunks(),
                    Priority.BACKGROUND,
                    merge_gap_bytes=s.merge_gap_bytes,
                    span_bytes=s.background_batch_bytes,
                    before_batch=self.scheduler.wait_quiet,
                )
        except AlsdError as exc:
            layer.background_state = f"failed: {exc}"
            log.warning("%s: background fetch failed: %s", layer.source.name, exc)
            return
        layer.background_state = "done"

    async def _warm(
        self,
        layer: Layer,
        chunks: Iterable[tuple[int, Chunk]],
        priority: Priority,
        *,
        merge_gap_bytes: int,
        span_bytes: int,
        before_batch: Callable[[], Awaitable[None]] | None = None,
        max_request_bytes: int | None = None,
    ) -> None:
        """Fetch and store the chunks the store lacks, in batches of about ``span_bytes``.

        Idempotent: chunks already stored are skipped, so a cancelled run can be restarted
        without losing or refetching anything.
        """
        batch: list[tuple[int, Chunk]] = []
        start = 0
        for node, c in chunks:
            if c.zeros or self._store.has(c.digest):
                continue
            if batch and c.fetch_end - start > span_bytes:
                await self._warm_batch(
                    layer, batch, priority, merge_gap_bytes, before_batch, max_request_bytes
                )
                batch = []
            if not batch:
                start = c.blob_offset
            batch.append((node, c))
        if batch:
            await self._warm_batch(
                layer, batch, priority, merge_gap_bytes, before_batch, max_request_bytes
            )

    async def _warm_batch(
        self,
        layer: Layer,
        batch: list[tuple[int, Chunk]],
        priority: Priority,
        merge_gap_bytes: int,
        before_batch: Callable[[], Awaitable[None]] | None,
        max_request_bytes: int | None = None,
    ) -> None:
        if before_batch is not None:
            await before_batch()
        await self.fetcher.get_chunks(
            layer.source,
            batch,
            priority,
            merge_gap_bytes=merge_gap_bytes,
            keep=False,
            max_request_bytes=max_request_bytes,
        )

    # ================================================================ status

    def layers(self) -> list[Layer]:
        return list(self._layers.values())

    def status(self) -> dict[str, Any]:
        store_stats: Mapping[str, Any] = {}
        stats_fn = getattr(self._store, "stats", None)
        if callable(stats_fn):
            try:
                store_stats = dict(stats_fn())
            except (AlsdError, OSError) as exc:
                store_stats = {"error": str(exc)}
        return {
            "layers": [
                {
                    "ref": layer.ref,
                    "digest": layer.blob_digest,
                    "toc_digest": layer.toc_digest,
                    "format": layer.format,
                    "layer_no": layer.layer_no,
                    "use_count": layer.use_count,
                    "compressed_size": layer.compressed_size,
                    "uncompressed_size": layer.uncompressed_size,
                    "bytes_fetched": layer.stats.bytes_fetched,
                    "bytes_served": layer.stats.bytes_served,
                    "requests": layer.stats.requests,
                    "http_requests": layer.source.counter.requests,
                    "prefetch": layer.prefetch_state,
                    "prefetch_end": layer.index.prefetch_end,
                    "background": layer.background_state,
                    "from_metadata": layer.from_metadata,
                }
                for layer in self._layers.values()
            ],
            "images": sorted(self._images),
            "resolving": len(self._layer_tasks) + len(self._image_tasks),
            "negative_cache_entries": len(self._negative),
            "chunk_store": store_stats,
            "fetch": self.fetcher.stats.as_dict(),
            "inflight_chunks": self.fetcher.inflight_count(),
            "scheduler": self.scheduler.status(),
            "engine": dict(vars(self.stats)),
            "registry": {
                "requests": self.registry_counter.requests,
                "bytes": self.registry_counter.bytes,
            },
        }


# ==================================================================== helpers


def _discard(tasks: list[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    with contextlib.suppress(ValueError):
        tasks.remove(task)


def _fresh(exc: AlsdError) -> AlsdError:
    """A new exception like ``exc`` (re-raising one instance piles up tracebacks)."""
    try:
        new = type(exc)(*exc.args)
    except TypeError:
        new = AlsdError(*exc.args)
    return new


def _take_while(
    it: Iterable[tuple[int, Chunk]], pred: Callable[[Chunk], bool]
) -> Iterable[tuple[int, Chunk]]:
    for node, c in it:
        if not pred(c):
            return
        yield node, c


def _assemble(
    layer: Layer,
    node: int,
    chunks: Sequence[Chunk],
    got: Mapping[str, bytes],
    offset: int,
    end: int,
) -> bytes:
    out = bytearray()
    pos = offset
    for c in chunks:
        if c.file_offset + c.size <= pos:
            continue
        if c.file_offset > pos:
            break
        data = got[c.digest]
        if len(data) != c.size:
            raise IntegrityError(
                f"{layer.source.name}: {layer.index.path(node)}@{c.file_offset}: chunk has "
                f"{len(data)} bytes, TOC says {c.size}"
            )
        hi = min(end, c.file_offset + c.size)
        out += data[pos - c.file_offset : hi - c.file_offset]
        pos = hi
        if pos >= end:
            break
    if pos != end:
        raise FormatError(
            f"{layer.source.name}: {layer.index.path(node)}: chunks do not cover "
            f"[{offset}, {end}) (stopped at {pos})"
        )
    return bytes(out)


def _resolved_bytes(resolved: Any) -> tuple[bytes, bytes]:
    """Manifest and config bytes of a registry ResolvedImage."""
    m = getattr(resolved, "manifest_bytes", None)
    c = getattr(resolved, "config_bytes", None)
    if not isinstance(m, bytes) or not isinstance(c, bytes):
        raise StoreError("registry client returned an image without manifest/config bytes")
    return m, c
