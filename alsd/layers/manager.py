"""The layer manager: the facade the filesystem talks to (get_layer, read, use/release, status).

Sits between the filesystem (alsd/fs) and the registry client; knows nothing of FUSE.
It wires the parts of this package and keeps what spans them:

* :meth:`LayerManager.get_layer` bounds a lookup by ``resolve_timeout_s`` around the
  :class:`~alsd.layers.resolver.LayerResolver` (images: :mod:`alsd.layers.images`) and
  remembers failures per (reference, digest) for ``negative_cache_ttl_s``;
* reads go to the :class:`~alsd.layers.reader.Reader`;
* a resolved layer is adopted: kept in memory, its landmark prefetch and background
  fetch started (:mod:`alsd.layers.prefetch`);
* use/release counts; a layer is dropped from memory ``release_grace_s`` after its count
  fell to zero (its chunks stay in the chunk store, its tasks are cancelled);
* records are persisted through :mod:`alsd.layers.records`, so that after a restart a
  known layer is answered without a single registry request.

Concurrency rule: everything runs on the event loop thread. Resolutions are singleflight
tasks detached from the FUSE request that started them (``asyncio.shield``), so a
timed-out or interrupted lookup does not abort a resolution another lookup is waiting
for. See developer-notes/concurrency.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from alsd.config import LayerSettings
from alsd.counters import ByteCounter
from alsd.errors import AlsdError, Transient, UnknownLayer
from alsd.fetch.fetcher import ChunkStoreLike, Fetcher
from alsd.fetch.scheduler import Scheduler
from alsd.layers.images import ImageCatalog
from alsd.layers.materialize import LayerDirs
from alsd.layers.materializer import Materializer, SpaceLike
from alsd.layers.model import Image, Layer, LayerStats
from alsd.layers.ports import MetadataLike, RegistryLike
from alsd.layers.prefetch import LayerTasks, Prefetcher
from alsd.layers.profiles import Lookup, ProfileBook
from alsd.layers.reader import Reader
from alsd.layers.records import Records
from alsd.layers.resolver import LayerResolver
from alsd.layers.singleflight import NegativeCache

log = logging.getLogger(__name__)


class LayerManager:
    """See the module docstring."""

    def __init__(
        self,
        registry: RegistryLike,
        chunkstore: ChunkStoreLike,
        metadata: MetadataLike | None,
        settings: LayerSettings | None = None,
        *,
        profile_lookup: Lookup | None = None,
        layer_dirs: LayerDirs | None = None,
        space: SpaceLike | None = None,
        link_prefix: str = "",
    ) -> None:
        """``layer_dirs``, ``space`` (the chunk store's budget, shared with them) and
        ``link_prefix``: where and how complete layers are materialised (used only with
        ``settings.materialize``; see :mod:`alsd.layers.materializer`)."""
        self.settings = s = settings or LayerSettings()
        self._store = chunkstore
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
        self.stats = LayerStats()
        # Every registry request the manager causes is counted here (children per layer).
        self.registry_counter = ByteCounter()
        self._negative: NegativeCache[tuple[str, str]] = NegativeCache(
            s.negative_cache_ttl_s, on_hit=self._count_negative_hit
        )
        records = Records(metadata, self.stats)
        self.profiles = ProfileBook(
            metadata,
            record=s.profiles_record,
            use=s.profiles_use,
            window_s=s.record_window_s,
            max_files=s.record_max_files,
            lookup=profile_lookup,
            lookup_wait_s=s.profile_lookup_wait_s,
            negative_ttl_s=s.negative_cache_ttl_s,
        )
        self._images = ImageCatalog(
            registry, records, self._negative, self.stats, self.registry_counter
        )
        self._resolver = LayerResolver(
            registry,
            self._images,
            records,
            self._negative,
            s,
            self.stats,
            self.registry_counter,
            adopt=self._adopt,
            on_image=self._image_started,
        )
        self._tasks = LayerTasks()
        self._prefetcher = Prefetcher(
            self.fetcher, chunkstore, self.scheduler, self._tasks, s, self.profiles
        )
        self._reader = Reader(
            registry, self.fetcher, chunkstore, self.scheduler, self._tasks, s, self.stats,
            self.profiles,
        )  # fmt: skip
        self._drop_timers: dict[Layer, asyncio.TimerHandle] = {}
        self._closed = False
        on = s.materialize and layer_dirs is not None and space is not None
        self._materializer = Materializer(
            chunkstore,
            self.fetcher,
            layer_dirs if on else None,
            space if on else None,
            link_prefix=link_prefix,
        )
        self._materializer.on_ready = self._materialized
        self._materializer.on_removed = self._unmaterialized
        self._prefetcher.on_complete = self._materializer.consider
        self._reader.on_fetched = self._materializer.poke
        # Called (on the event loop) for each layer in memory whose diff just became a
        # symlink to its directory, and with the TOC digest of a layer whose directory was
        # removed (none in memory then): the filesystem drops the kernel's cached entries.
        self.on_materialized: Callable[[Layer], None] | None = None
        self.on_unmaterialized: Callable[[str], None] | None = None

    def _count_negative_hit(self) -> None:
        self.stats.negative_hits += 1

    # ================================================================ lifecycle

    async def load_state(self) -> None:
        """Load persisted images (layers are loaded from metadata when first asked for)
        and find the layers materialised by a previous run."""
        await self._images.load()
        await self.profiles.load()
        await self._materializer.open()

    async def close(self) -> None:
        """Stop every task (resolutions, prefetch, background, read-ahead, fetches)."""
        self._closed = True
        self._reader.closed = True
        tasks: list[asyncio.Task[Any]] = [
            *self._images.cancel_all(),
            *self._resolver.cancel_all(),
            *self._tasks.cancel_all(),
        ]
        for timer in self._drop_timers.values():
            timer.cancel()
        self._drop_timers.clear()
        await self._materializer.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.profiles.close()
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
        self._negative.check(key)
        try:
            async with asyncio.timeout(self.settings.resolve_timeout_s):
                layer = await self._resolver.resolve(ref, digest)
        except TimeoutError:
            self.stats.resolve_timeouts += 1
            # The registry is slow or silent: the next layers of this pull should not
            # wait resolve_timeout_s each.
            self._images.mark_slow(ref)
            # Not cached: the resolution goes on and a later lookup may find it done.
            raise Transient(
                f"{ref} {digest}: not resolved within {self.settings.resolve_timeout_s} s"
            ) from None
        except AlsdError as exc:
            self._negative.remember(key, exc)
            raise
        if layer.use_count == 0:
            self._arm_drop(layer)
        self._materializer.first_use(layer)
        self._attach(layer)
        return layer

    def _image_started(self, img: Image) -> None:
        """The first lookup of an image: look for its registry profile meanwhile."""
        self.profiles.start_lookup(img.ref, img.digest, [d.digest for d in img.manifest.layers])

    def _adopt(self, layer: Layer) -> None:
        """A resolution finished: keep the layer and start its prefetch/background."""
        if self._closed or not self._resolver.keep(layer):
            return
        self._attach(layer)
        self._prefetcher.start(layer)
        self._arm_drop(layer)
        # After a restart every chunk may already be stored.
        self._materializer.consider(layer)

    def _attach(self, layer: Layer) -> None:
        """Point a layer at its materialised directory, if it has one."""
        if layer.diff_link is None:
            layer.diff_link = self._materializer.link_for(layer)
            layer.local_tree = self._materializer.tree(layer)

    def _unmaterialized(self, toc_digest: str) -> None:
        if self.on_unmaterialized is not None:
            self.on_unmaterialized(toc_digest)

    def _materialized(self, toc_digest: str) -> None:
        for layer in self._resolver.layers():
            if layer.index.toc_digest == toc_digest and layer.diff_link is None:
                self._attach(layer)
                if self.on_materialized is not None:
                    self.on_materialized(layer)

    # ================================================================ use / release

    def use(self, layer: Layer) -> None:
        layer.use_count += 1
        timer = self._drop_timers.pop(layer, None)
        if timer is not None:
            timer.cancel()
        if self._resolver.known(layer.key) is not layer and not self._closed:
            # Dropped while the filesystem still held it: take it back (and resume fetching).
            self._adopt(layer)

    def release(self, layer: Layer) -> None:
        if layer.use_count <= 0:
            # Normal after a restart: podman's counts were not persisted
            # (developer-notes/protocol.md, "use").
            log.debug("release of %s without a use", layer.source.name)
            return
        layer.use_count -= 1
        if layer.use_count == 0:
            self._arm_drop(layer)

    def _arm_drop(self, layer: Layer) -> None:
        timer = self._drop_timers.pop(layer, None)
        if timer is not None:
            timer.cancel()
        self._drop_timers[layer] = asyncio.get_running_loop().call_later(
            self.settings.release_grace_s, self._drop, layer
        )

    def _drop(self, layer: Layer) -> None:
        self._drop_timers.pop(layer, None)
        if layer.use_count > 0:
            return
        self._resolver.forget(layer)
        self._prefetcher.stop(layer)
        self._reader.forget(layer)
        self.profiles.layer_dropped(layer.image_digest, layer.blob_digest)
        toc = layer.index.toc_digest
        if not any(la.index.toc_digest == toc for la in self._resolver.layers()):
            self._materializer.released(toc)
        log.debug("dropped %s from memory", layer.source.name)

    # ================================================================ reads

    async def read(self, layer: Layer, node: int, offset: int, size: int) -> bytes:
        """Exactly the bytes ``[offset, offset+size)`` of file ``node`` (short at EOF)."""
        try:
            return await self._reader.read(layer, node, offset, size)
        finally:
            self._prefetcher.note_read(layer)

    async def read_blob(self, layer: Layer, offset: int, size: int) -> bytes:
        """Raw compressed bytes of the layer blob (for the ``blob`` file)."""
        return await self._reader.read_blob(layer, offset, size)

    # ================================================================ status

    def layers(self) -> list[Layer]:
        return self._resolver.layers()

    def status(self) -> dict[str, Any]:
        store_stats: Mapping[str, Any]
        try:
            store_stats = dict(self._store.stats())
        except (AlsdError, OSError) as exc:
            store_stats = {"error": str(exc)}
        return {
            "layers": [
                {
                    **_layer_status(layer),
                    **self._materializer.layer_status(layer),
                    "content_bytes": _content_bytes(layer),
                }
                for layer in self._resolver.layers()
            ],
            "images": self._images.refs(),
            "resolving": self._resolver.resolving() + self._images.resolving(),
            "negative_cache_entries": len(self._negative),
            "chunk_store": store_stats,
            "fetch": self.fetcher.stats.as_dict(),
            "inflight_chunks": self.fetcher.inflight_count(),
            "scheduler": self.scheduler.status(),
            "engine": self.stats.as_dict(),
            "registry": self.registry_counter.as_dict(),
            "profiles": dict(self.profiles.status()),
            "materialize": {
                **self._materializer.stats(),
                "local_reads": self._reader.local_reads,
                "local_read_errors": self._reader.local_read_errors,
            },
        }


def _content_bytes(layer: Layer) -> int:
    """Uncompressed bytes of the layer's files (what ``local_bytes`` is a share of)."""
    return sum(chunk.size for _, chunk in layer.index.iter_chunks())


def _layer_status(layer: Layer) -> dict[str, Any]:
    return {
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
        "prefetch": layer.prefetch_status(),
        "prefetch_end": layer.index.prefetch_end,
        "background": layer.background_status(),
        "profile": layer.profile_state,
        "profile_entries": layer.profile_entries,
        "profile_chunks": layer.profile_chunks,
        "profile_bytes": layer.profile_bytes,
        "from_metadata": layer.from_metadata,
    }
