"""Fetching ahead of the reads: landmark prefetch, background fetch, and the tasks of a layer.

* profile prefetch: the chunks of the files the image's prefetch profile lists
  (:mod:`alsd.layers.profiles`), in the profile's order, before the landmark region;
* landmark prefetch: the prioritised region of an optimised eStargz layer (the files
  before ``.prefetch.landmark``, in the order the container reads them) is fetched as
  soon as the layer is resolved, in ``prefetch_request_bytes`` pieces;
* background fetch: after the prefetch and the first read of one of the layer's files
  (or ``background_unread_wait_s`` without one), the rest of the layer is fetched in
  batches of ``background_batch_bytes``, each one waiting until reads have been quiet for
  a while (:class:`~alsd.fetch.scheduler.Scheduler`): it never competes with podman's
  pull or a starting container for the link.

Both are idempotent: chunks already stored are skipped, so a cancelled run restarts
without losing or refetching anything. :class:`LayerTasks` owns every task working on a
layer (these two and the reader's read-ahead); dropping a layer cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from alsd.config import LayerSettings
from alsd.errors import AlsdError
from alsd.fetch.fetcher import ChunkStoreLike, Fetcher
from alsd.fetch.scheduler import Priority, Scheduler
from alsd.layers.model import BackgroundState, Layer, PrefetchState
from alsd.layers.profiles import ProfileBook
from alsd.oci.layer_index import Chunk
from alsd.oci.profile import covered_bytes, profile_chunks

log = logging.getLogger(__name__)


class LayerTasks:
    """The tasks working on each layer in memory."""

    def __init__(self) -> None:
        self._tasks: dict[Layer, list[asyncio.Task[None]]] = {}

    def spawn(self, layer: Layer, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        tasks = self._tasks.setdefault(layer, [])
        tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            with contextlib.suppress(ValueError):
                tasks.remove(t)

        task.add_done_callback(done)
        return task

    def cancel(self, layer: Layer) -> None:
        for t in self._tasks.pop(layer, []):
            t.cancel()

    def cancel_all(self) -> list[asyncio.Task[None]]:
        tasks = [t for ts in self._tasks.values() for t in ts]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        return tasks


class Prefetcher:
    def __init__(
        self,
        fetcher: Fetcher,
        store: ChunkStoreLike,
        scheduler: Scheduler,
        tasks: LayerTasks,
        settings: LayerSettings,
        profiles: ProfileBook | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._store = store
        self._scheduler = scheduler
        self._tasks = tasks
        self._settings = settings
        self._profiles = profiles
        # Called when a layer's background fetch has stored every chunk it lacked.
        self.on_complete: Callable[[Layer], None] | None = None
        self._read: dict[Layer, asyncio.Event] = {}  # set at the first read of a layer

    def note_read(self, layer: Layer) -> None:
        """A file of ``layer`` was read (hit or miss): its container has started."""
        ev = self._read.get(layer)
        if ev is None:
            ev = self._read[layer] = asyncio.Event()
        ev.set()
        self._scheduler.touch()

    def start(self, layer: Layer) -> None:
        """Start the landmark prefetch and the background fetch of a layer just adopted."""
        prefetch = self._tasks.spawn(layer, self._prefetch(layer))
        self._tasks.spawn(layer, self._background(layer, prefetch))

    def stop(self, layer: Layer) -> None:
        """Cancel everything working on ``layer`` (dropped from memory)."""
        self._tasks.cancel(layer)
        self._read.pop(layer, None)
        if layer.prefetch_state.active:
            layer.prefetch_state = PrefetchState.CANCELLED
        if layer.background_state.active:
            layer.background_state = BackgroundState.CANCELLED

    async def _prefetch(self, layer: Layer) -> None:
        await self._profile_prefetch(layer)
        await self._landmark(layer)

    async def _profile_prefetch(self, layer: Layer) -> None:
        """Fetch the chunks the image's prefetch profile names for this layer, in order.

        Like the landmark region, at prefetch priority (below on-demand reads, above the
        background fetch), in ``prefetch_request_bytes`` requests issued in the profile's
        order with up to ``fetch_concurrency`` in flight. Every chunk is verified against
        the TOC as always: a profile decides only what is fetched first.
        """
        if self._profiles is None or not self._profiles.use:
            layer.profile_state = "disabled"
            return
        try:
            entries = await self._profiles.entries_for(
                layer.ref, layer.image_digest, layer.blob_digest, layer.index
            )
        except AlsdError as exc:  # entries_for logs its own problems; this is a backstop
            layer.profile_state = f"failed: {exc}"
            return
        chunks = profile_chunks(layer.index, entries)
        layer.profile_entries = len(entries)
        layer.profile_chunks = len(chunks)
        layer.profile_bytes = covered_bytes(chunks)
        if not chunks:
            layer.profile_state = "none"
            return
        layer.profile_digests = frozenset(c.digest for _, c in chunks)
        layer.profile_state = "running"
        try:
            with self._scheduler.prefetching():
                await self._warm_in_order(layer, chunks)
        except AlsdError as exc:
            layer.profile_state = f"failed: {exc}"
            log.warning("%s: profile prefetch failed: %s", layer.source.name, exc)
            return
        layer.profile_state = "done"

    async def _warm_in_order(self, layer: Layer, chunks: list[tuple[int, Chunk]]) -> None:
        s = self._settings
        limit = s.prefetch_request_bytes
        batches: list[list[tuple[int, Chunk]]] = []
        size = 0
        for node, c in chunks:
            if c.zeros or self._store.has(c.digest):
                continue
            n = c.fetch_end - c.blob_offset
            if not batches or size + n > limit:
                batches.append([])
                size = 0
            batches[-1].append((node, c))
            size += n
        slots = asyncio.Semaphore(max(1, s.fetch_concurrency))
        errors: list[AlsdError] = []

        async def one(batch: list[tuple[int, Chunk]]) -> None:
            try:
                await self._fetcher.get_chunks(
                    layer.source, batch, Priority.PREFETCH,
                    merge_gap_bytes=s.merge_gap_bytes, keep=False, max_request_bytes=limit,
                )  # fmt: skip
            except AlsdError as exc:
                errors.append(exc)
            finally:
                slots.release()

        running: list[asyncio.Task[None]] = []
        try:
            for batch in batches:
                await slots.acquire()
                if errors:
                    slots.release()
                    break
                running.append(asyncio.get_running_loop().create_task(one(batch)))
                # Let this batch register and flush on its own before the next one: the
                # fetcher merges the wants of one loop turn into offset order.
                for _ in range(3):
                    await asyncio.sleep(0)
            await asyncio.gather(*running)
        finally:
            for t in running:
                t.cancel()
        if errors:
            raise errors[0]

    async def _landmark(self, layer: Layer) -> None:
        idx = layer.index
        s = self._settings
        if not s.prefetch_landmark:
            layer.prefetch_state = PrefetchState.DISABLED
            return
        if idx.prefetch != "landmark" or idx.prefetch_end <= 0:
            layer.prefetch_state = (
                PrefetchState.NO_LANDMARK
                if idx.prefetch is None
                else PrefetchState.DISABLED_BY_LANDMARK
            )
            return
        layer.prefetch_state = PrefetchState.RUNNING
        end = idx.prefetch_end
        try:
            with self._scheduler.prefetching():
                await self.warm(
                    layer,
                    _take_while(idx.iter_chunks(), lambda c: c.blob_offset < end),
                    Priority.PREFETCH,
                    # The region is fetched whole, in prefetch_request_bytes pieces.
                    merge_gap_bytes=end,
                    span_bytes=s.max_request_bytes * s.fetch_concurrency,
                    max_request_bytes=s.prefetch_request_bytes,
                )
        except AlsdError as exc:
            layer.prefetch_state = PrefetchState.FAILED
            layer.prefetch_error = str(exc)
            log.warning("%s: prefetch failed: %s", layer.source.name, exc)
            return
        layer.prefetch_state = PrefetchState.DONE

    async def _background(self, layer: Layer, prefetch: asyncio.Task[None]) -> None:
        s = self._settings
        if not s.prefetch_background:
            layer.background_state = BackgroundState.DISABLED
            return
        if s.background_max_layer_bytes is not None and (
            layer.compressed_size > s.background_max_layer_bytes
        ):
            layer.background_state = BackgroundState.TOO_LARGE
            return
        await asyncio.wait([prefetch])
        layer.background_state = BackgroundState.WAITING
        # Not while podman pulls or a container starts on the layer: after its first read
        # (then wait_quiet below holds each batch back while reads go on), or after a
        # while if nothing reads it.
        read = self._read.setdefault(layer, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read.wait(), s.background_unread_wait_s)
        try:
            async with self._scheduler.background():
                layer.background_state = BackgroundState.RUNNING
                await self.warm(
                    layer,
                    layer.index.iter_chunks(),
                    Priority.BACKGROUND,
                    merge_gap_bytes=s.merge_gap_bytes,
                    span_bytes=s.background_batch_bytes,
                    before_batch=self._scheduler.wait_quiet,
                )
        except AlsdError as exc:
            layer.background_state = BackgroundState.FAILED
            layer.background_error = str(exc)
            log.warning("%s: background fetch failed: %s", layer.source.name, exc)
            return
        layer.background_state = BackgroundState.DONE
        if self.on_complete is not None:
            self.on_complete(layer)

    async def warm(
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
        """Fetch and store the chunks the store lacks, in batches of about ``span_bytes``."""
        batch: list[tuple[int, Chunk]] = []
        start = 0
        for node, c in chunks:
            if c.zeros or self._store.has(c.digest):
                continue
            if batch and c.fetch_end - start > span_bytes:
                await self._batch(
                    layer, batch, priority, merge_gap_bytes, before_batch, max_request_bytes
                )
                batch = []
            if not batch:
                start = c.blob_offset
            batch.append((node, c))
        if batch:
            await self._batch(
                layer, batch, priority, merge_gap_bytes, before_batch, max_request_bytes
            )

    async def _batch(
        self,
        layer: Layer,
        batch: list[tuple[int, Chunk]],
        priority: Priority,
        merge_gap_bytes: int,
        before_batch: Callable[[], Awaitable[None]] | None,
        max_request_bytes: int | None,
    ) -> None:
        if before_batch is not None:
            await before_batch()
        await self._fetcher.get_chunks(
            layer.source,
            batch,
            priority,
            merge_gap_bytes=merge_gap_bytes,
            keep=False,
            max_request_bytes=max_request_bytes,
        )


def _take_while(
    it: Iterable[tuple[int, Chunk]], pred: Callable[[Chunk], bool]
) -> Iterable[tuple[int, Chunk]]:
    for node, c in it:
        if not pred(c):
            return
        yield node, c
