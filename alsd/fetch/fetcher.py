"""Turn chunk requests into verified chunk bytes: store first, then coalesced range reads.

:meth:`Fetcher.get_chunks` answers a set of chunks of one blob. Chunks the content-addressed
chunk store already holds are read from it; the missing ones are fetched from the registry
with as few range requests as possible, decoded, verified against their digest
(``formats.decode_chunk``) and only then stored and returned. A chunk that fails
verification is neither stored nor returned: every waiter gets the IntegrityError.

Concurrency rules (details in developer-notes/concurrency.md):

* in-flight deduplication: ``_inflight[digest]`` holds the one Future of a chunk being
  fetched. Checking the dict, checking the store and registering a new Future happen
  without an await in between, so two readers can never both decide to fetch a digest;
* reads queued in the same event-loop iteration are merged: missing chunks go to a pending
  list that a ``call_soon`` callback flushes, so the handlers of one burst of FUSE reads
  end up in the same range requests;
* a fetch batch runs in its own task, detached from the caller: a reader that is cancelled
  (interrupted syscall) does not cancel a fetch that other readers wait for. Batches are
  bounded in size, so they always finish soon; only :meth:`close` cancels them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from alsd.counters import ByteCounter
from alsd.errors import AlsdError, IntegrityError, RegistryError
from alsd.fetch.scheduler import Priority, Scheduler
from alsd.oci import formats
from alsd.oci.layer_index import Chunk, LayerFormat
from alsd.oci.ranges import bodies_fit
from alsd.oci.reference import Reference

log = logging.getLogger(__name__)

# Upper bounds of the request latency histogram (seconds), Prometheus style.
LATENCY_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RangeReader(Protocol):
    """The part of RegistryClient the fetcher uses."""

    async def read_ranges(
        self,
        ref: Reference,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        counter: ByteCounter | None = None,
    ) -> list[bytes]: ...


class ChunkStoreLike(Protocol):
    """The part of ChunkStore the fetcher uses (content addressed by chunk digest)."""

    def has(self, digest: str) -> bool: ...

    async def get(self, digest: str) -> bytes | None: ...

    async def put(self, digest: str, data: bytes) -> bool: ...

    async def get_range(self, digest: str, start: int, end: int) -> bytes | None:
        """``chunk[start:end]`` of a stored chunk, or None if it is not (any more) stored."""

    def advise(self, digest: str) -> None:
        """Hint that the chunk will be read soon (the store may start reading it)."""

    def stats(self) -> dict[str, int]:
        """The store's counters for /status."""


@dataclass
class ByteStats:
    """Per-layer byte counters (kept on the Layer, reported by /status)."""

    bytes_fetched: int = 0  # compressed bytes received from the registry
    bytes_served: int = 0  # uncompressed bytes returned to readers
    requests: int = 0


@dataclass(frozen=True)
class BlobSource:
    """What the fetcher needs to know about one layer blob."""

    name: str  # for log messages: "<ref>@<blob digest>"
    ref: Reference
    blob_digest: str
    format: LayerFormat
    blob_size: int
    path_of: Callable[[int], str]  # node -> path, for error messages
    stats: ByteStats = field(default_factory=ByteStats)
    # HTTP requests and bytes spent on this blob (adds into the manager's total).
    counter: ByteCounter = field(default_factory=ByteCounter)
    # Chunks of this blob that failed verification (digest -> the error): read again, they
    # fail at once instead of being fetched again. A source lives as long as its layer
    # is resolved, so a layer resolved anew (after it was dropped) tries them again.
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class FetchPhases:
    """Where the time of fetch batches went, summed over batches (seconds): ``queue`` from
    the first chunk queued to the batch's task running, ``slot`` waiting for a fetch slot,
    ``network`` the range request up to its whole body, ``decode`` decompressing and
    verifying every chunk (worker thread), ``store`` writing them to the chunk store (the
    waiters of a chunk are woken before, as soon as it is verified)."""

    batches: int = 0
    queue_s: float = 0.0
    slot_s: float = 0.0
    network_s: float = 0.0
    decode_s: float = 0.0
    store_s: float = 0.0

    def add(self, queue: float, slot: float, network: float, decode: float, store: float) -> None:
        self.batches += 1
        self.queue_s += queue
        self.slot_s += slot
        self.network_s += network
        self.decode_s += decode
        self.store_s += store


@dataclass
class FetchStats:
    """Engine-wide counters for /metrics."""

    requests: int = 0
    request_errors: int = 0
    bytes_fetched: int = 0
    chunks_fetched: int = 0
    chunk_hits: int = 0  # served from the chunk store
    chunk_misses: int = 0  # had to be fetched (or joined an in-flight fetch)
    inflight_joins: int = 0
    integrity_errors: int = 0
    known_bad: int = 0  # reads refused at once: the chunk failed verification before
    store_full: int = 0  # chunks served from memory because put() refused them
    latency_sum_s: float = 0.0
    latency_count: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    phases: FetchPhases = field(default_factory=FetchPhases)

    def observe(self, seconds: float) -> None:
        self.latency_sum_s += seconds
        self.latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_buckets[i] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "request_errors": self.request_errors,
            "bytes_fetched": self.bytes_fetched,
            "chunks_fetched": self.chunks_fetched,
            "chunk_hits": self.chunk_hits,
            "chunk_misses": self.chunk_misses,
            "inflight_joins": self.inflight_joins,
            "integrity_errors": self.integrity_errors,
            "known_bad": self.known_bad,
            "store_full": self.store_full,
            "latency_sum_s": self.latency_sum_s,
            "latency_count": self.latency_count,
            **{f"phase_{k}": v for k, v in vars(self.phases).items()},
            # Flat keys (cumulative counts per upper bound), so /metrics can export them.
            **{
                f"latency_le_{str(b).replace('.', '_')}_s": n
                for b, n in zip(LATENCY_BUCKETS_S, self.latency_buckets, strict=True)
            },
        }


@dataclass(frozen=True)
class _Want:
    chunk: Chunk
    node: int
    future: asyncio.Future[bytes]


@dataclass
class _Pending:
    source: BlobSource
    priority: Priority
    merge_gap_bytes: int
    max_request_bytes: int
    wants: list[_Want] = field(default_factory=list)
    queued_at: float = field(default_factory=time.monotonic)  # first want queued


def _consume(fut: asyncio.Future[bytes]) -> None:
    # Mark the exception as retrieved: a waiter may have been cancelled meanwhile, and the
    # error is logged where it happens.
    if not fut.cancelled():
        fut.exception()


def plan_ranges(
    chunks: Sequence[Chunk], merge_gap_bytes: int, max_request_bytes: int
) -> list[tuple[int, int, list[Chunk]]]:
    """Group chunks (any order) into ranges ``(start, end, chunks)``.

    Neighbours are merged when the gap between them is at most ``merge_gap_bytes`` and the
    merged range stays within ``max_request_bytes``. Overlapping compressed ranges (legacy
    stargz chunks sharing a gzip member) always merge; adjacent ones (gap 0) only within
    the bound (eStargz chunks are adjacent: merging them always made one range of any
    region, whatever the bound).
    """
    out: list[tuple[int, int, list[Chunk]]] = []
    for c in sorted(chunks, key=lambda c: (c.blob_offset, c.fetch_end)):
        if out:
            start, end, members = out[-1]
            new_end = max(end, c.fetch_end)
            if c.blob_offset < end or (
                c.blob_offset - end <= merge_gap_bytes and new_end - start <= max_request_bytes
            ):
                members.append(c)
                out[-1] = (start, new_end, members)
                continue
        out.append((c.blob_offset, c.fetch_end, [c]))
    return out


class Fetcher:
    """Verified chunk access for the engine (see module docstring)."""

    def __init__(
        self,
        registry: RangeReader,
        store: ChunkStoreLike,
        scheduler: Scheduler,
        *,
        merge_gap_bytes: int = 64 << 10,
        max_request_bytes: int = 8 << 20,
        max_ranges_per_request: int = 16,
    ) -> None:
        self._registry = registry
        self._store = store
        self._scheduler = scheduler
        self.merge_gap_bytes = merge_gap_bytes
        self.max_request_bytes = max_request_bytes
        self.max_ranges_per_request = max_ranges_per_request
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        # Chunks verified and handed to their readers but still being written to the
        # store: callers that asked only for them to be stored (keep=False) wait here.
        self._writes: dict[str, asyncio.Future[None]] = {}
        self._pending: dict[tuple[str, Priority, int, int], _Pending] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._store_full_warned = 0.0
        self.stats = FetchStats()

    # ---- public --------------------------------------------------------------------

    async def get_chunks(
        self,
        source: BlobSource,
        wanted: Iterable[tuple[int, Chunk]],
        priority: Priority = Priority.DEMAND,
        *,
        merge_gap_bytes: int | None = None,
        keep: bool = True,
        max_request_bytes: int | None = None,
    ) -> dict[str, bytes]:
        """Return ``{digest: uncompressed bytes}`` for each ``(node, chunk)`` in ``wanted``.

        ``keep=False`` (prefetch/background) only makes sure the chunks are fetched and
        stored and returns an empty dict, so large batches are not held in memory.
        ``max_request_bytes`` bounds each registry request of this call (default: the
        fetcher's): smaller requests finish, and so serve their chunks, sooner.
        "Zeros" chunks are not in the result (they are all zero bytes: the caller makes
        the ones it needs, never a whole huge hole). A chunk of ``source`` that failed
        verification before is not fetched again: IntegrityError at once (``keep=False``:
        skipped).
        Raises IntegrityError, RegistryError or StoreError.
        """
        if self._closed:
            raise RegistryError("engine is closed")
        wanted = list(wanted)
        if source.failed:
            for _, chunk in wanted:
                why = source.failed.get(chunk.digest)
                if why is not None and keep:
                    self.stats.known_bad += 1
                    raise IntegrityError(f"{why} (failed before; not fetched again)")
            wanted = [(n, c) for n, c in wanted if c.digest not in source.failed]
        gap = self.merge_gap_bytes if merge_gap_bytes is None else merge_gap_bytes
        max_req = self.max_request_bytes if max_request_bytes is None else max_request_bytes
        result: dict[str, bytes] = {}
        waits: dict[str, asyncio.Future[bytes]] = {}
        stored: list[tuple[int, Chunk]] = []
        seen: set[str] = set()
        pending: _Pending | None = None
        # --- no await from here ... -------------------------------------------------
        for node, chunk in wanted:
            d = chunk.digest
            if d in seen:
                continue
            seen.add(d)
            if chunk.zeros:
                continue
            fut = self._inflight.get(d)
            if fut is not None:
                self.stats.chunk_misses += 1
                self.stats.inflight_joins += 1
                waits[d] = fut
                continue
            if self._store.has(d):
                self.stats.chunk_hits += 1
                if keep:
                    stored.append((node, chunk))
                continue
            self.stats.chunk_misses += 1
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_consume)
            self._inflight[d] = fut
            waits[d] = fut
            if pending is None:
                key = (source.blob_digest, priority, gap, max_req)
                pending = self._pending.get(key)
                if pending is None:
                    pending = self._pending[key] = _Pending(source, priority, gap, max_req)
            pending.wants.append(_Want(chunk, node, fut))
        if pending is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        # --- ... to here: the in-flight registration above is atomic. ----------------
        retry: list[tuple[int, Chunk]] = []
        for node, chunk in stored:
            data = await self._store.get(chunk.digest)
            if data is None:
                # Evicted between has() and get(): fetch it like any missing chunk.
                retry.append((node, chunk))
            else:
                result[chunk.digest] = data
        for d, fut in waits.items():
            data = await fut
            if keep:
                result[d] = data
        if not keep:
            # Prefetch and background promise stored chunks, not just fetched ones.
            for d in waits:
                if d in self._inflight:
                    w = self._writes.get(d)
                    if w is None:
                        w = self._writes[d] = asyncio.get_running_loop().create_future()
                    await w
        if retry:
            result.update(
                await self.get_chunks(
                    source, retry, priority, merge_gap_bytes=gap, keep=keep,
                    max_request_bytes=max_req,
                )
            )
        return result

    async def get_stored_slices(
        self, wanted: Sequence[tuple[Chunk, int, int]]
    ) -> list[bytes] | None:
        """Slices ``chunk[start:end]`` of chunks all held by the store (or zeros), or None.

        The fast path of a read whose chunks are stored: only the requested bytes are read
        from each chunk file, not whole chunks. None as soon as one chunk is not stored
        (or went missing): the caller then takes the general path, :meth:`get_chunks`.
        Chunks in the store were verified before they were stored.
        """
        for chunk, _, _ in wanted:
            if not chunk.zeros and not self._store.has(chunk.digest):
                return None
        out: list[bytes] = []
        for chunk, start, end in wanted:
            if chunk.zeros:
                out.append(bytes(max(0, min(end, chunk.size) - max(0, start))))
                continue
            data = await self._store.get_range(chunk.digest, start, end)
            if data is None:
                return None
            self.stats.chunk_hits += 1
            out.append(data)
        return out

    def advise_next(self, chunks: Sequence[Chunk], current: Chunk) -> None:
        """Hint the store that the chunk after ``current`` in ``chunks`` (a file's chunks, by
        offset) will be read soon, if the store holds it."""
        end = current.file_offset + current.size
        lo, hi = 0, len(chunks)
        while lo < hi:  # first chunk starting at or after end
            mid = (lo + hi) // 2
            if chunks[mid].file_offset < end:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(chunks):
            nxt = chunks[lo]
            if not nxt.zeros and self._store.has(nxt.digest):
                self._store.advise(nxt.digest)

    async def close(self) -> None:
        """Cancel every running fetch; waiters get CancelledError."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self._pending.values():
            for w in p.wants:
                w.future.cancel()
        self._pending.clear()
        for fut in self._inflight.values():
            fut.cancel()
        self._inflight.clear()
        for written in self._writes.values():
            written.cancel()
        self._writes.clear()

    def inflight_count(self) -> int:
        return len(self._inflight)

    # ---- batching ------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for p in pending.values():
            by_digest = {w.chunk.digest: w for w in p.wants}
            groups = plan_ranges(
                [w.chunk for w in p.wants], p.merge_gap_bytes, p.max_request_bytes
            )
            # Several ranges per request (multi-range), bounded in count and bytes.
            batch: list[tuple[int, int, list[_Want]]] = []
            size = 0
            for start, end, chunks in groups:
                wants = [by_digest[c.digest] for c in chunks if c.digest in by_digest]
                for c in chunks:
                    by_digest.pop(c.digest, None)
                if not wants:
                    continue
                if batch and (
                    len(batch) >= self.max_ranges_per_request
                    or size + (end - start) > p.max_request_bytes
                ):
                    self._start(p.source, p.priority, batch, p.queued_at)
                    batch, size = [], 0
                batch.append((start, end, wants))
                size += end - start
            if batch:
                self._start(p.source, p.priority, batch, p.queued_at)

    def _start(
        self,
        source: BlobSource,
        priority: Priority,
        batch: list[tuple[int, int, list[_Want]]],
        queued_at: float,
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run_batch(source, priority, batch, queued_at)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(
        self,
        source: BlobSource,
        priority: Priority,
        batch: list[tuple[int, int, list[_Want]]],
        queued_at: float,
    ) -> None:
        wants = [w for _, _, ws in batch for w in ws]
        t_task = time.monotonic()
        try:
            ranges = [(s, e) for s, e, _ in batch]
            async with self._scheduler.slot(priority):
                t0 = time.monotonic()
                try:
                    bodies = await self._registry.read_ranges(
                        source.ref, source.blob_digest, ranges, counter=source.counter
                    )
                finally:
                    self.stats.observe(time.monotonic() - t0)
                    self.stats.requests += 1
                    source.stats.requests += 1
            t_body = time.monotonic()
            if not bodies_fit(bodies, ranges):
                raise RegistryError(
                    f"{source.name}: registry returned {[len(b) for b in bodies]} bytes "
                    f"for ranges {ranges}"
                )
            got = sum(len(b) for b in bodies)
            self.stats.bytes_fetched += got
            source.stats.bytes_fetched += got
            decoded = await asyncio.to_thread(self._decode_batch, source, batch, bodies)
            t_decoded = time.monotonic()
            good: list[tuple[_Want, bytes]] = []
            for want, data in decoded:
                if isinstance(data, IntegrityError):
                    self.stats.integrity_errors += 1
                    source.failed[want.chunk.digest] = str(data)
                    self._finish(want, exc=data)
                    continue
                self.stats.chunks_fetched += 1
                # Verified: its readers go on now, from memory. The chunk stays in
                # _inflight until it is stored, so a reader arriving meanwhile joins this
                # resolved Future instead of fetching it again (see _finish).
                if not want.future.done():
                    want.future.set_result(data)
                good.append((want, data))
            for want, data in good:
                if not await self._put(want.chunk.digest, data):
                    self.stats.store_full += 1
                self._finish(want, data=data)
            t_done = time.monotonic()
            self.stats.phases.add(t_task - queued_at, t0 - t_task, t_body - t0,
                                  t_decoded - t_body, t_done - t_decoded)  # fmt: skip
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "fetch %s %s: %d range(s) %d B %d chunk(s): queue %.1f ms, slot %.1f ms, "
                    "network %.1f ms, decode+verify %.1f ms, store %.1f ms",
                    source.name, priority.name, len(ranges), got, len(wants),
                    (t_task - queued_at) * 1e3, (t0 - t_task) * 1e3, (t_body - t0) * 1e3,
                    (t_decoded - t_body) * 1e3, (t_done - t_decoded) * 1e3,
                )  # fmt: skip
        except asyncio.CancelledError:
            for w in wants:
                self._finish(w, cancel=True)
            raise
        except AlsdError as exc:
            self.stats.request_errors += 1
            log.warning("%s: fetching %d chunk(s) failed: %s", source.name, len(wants), exc)
            for w in wants:
                self._finish(w, exc=exc)
        except Exception as exc:  # never leave waiters hanging on an unexpected bug
            self.stats.request_errors += 1
            log.exception("%s: unexpected error while fetching chunks", source.name)
            err = RegistryError(f"{source.name}: fetch failed: {exc!r}")
            for w in wants:
                self._finish(w, exc=err)

    def _decode_batch(
        self,
        source: BlobSource,
        batch: list[tuple[int, int, list[_Want]]],
        bodies: list[bytes],
    ) -> list[tuple[_Want, bytes | IntegrityError]]:
        # Runs in a worker thread: pure CPU work (decompress + sha256), touches no shared
        # state; results are applied on the loop thread.
        out: list[tuple[_Want, bytes | IntegrityError]] = []
        for (start, _end, wants), body in zip(batch, bodies, strict=True):
            view = memoryview(body)
            for w in wants:
                c = w.chunk
                comp = bytes(view[c.blob_offset - start : c.fetch_end - start])
                path = source.path_of(w.node)
                try:
                    data = formats.decode_chunk(source.format, c, comp, path=path)
                except IntegrityError as exc:
                    log.error(
                        "integrity error: layer %s file %s offset %d (chunk %s, blob bytes "
                        "%d-%d): %s",
                        source.name, path, c.file_offset, c.digest, c.blob_offset, c.fetch_end,
                        exc,
                    )
                    out.append((w, exc))
                    continue
                except AlsdError as exc:
                    # A chunk that does not even decode cannot be trusted either.
                    log.error(
                        "integrity error: layer %s file %s offset %d: cannot decode: %s",
                        source.name, path, c.file_offset, exc,
                    )
                    out.append((w, IntegrityError(f"{source.name}: {path}@{c.file_offset}: {exc}")))
                    continue
                out.append((w, data))
        return out

    async def _put(self, digest: str, data: bytes) -> bool:
        try:
            ok = await self._store.put(digest, data)
        except AlsdError as exc:
            log.warning("chunk store refused %s (%s); serving from memory", digest, exc)
            return False
        if not ok:
            now = time.monotonic()
            if now - self._store_full_warned > 60:
                self._store_full_warned = now
                log.warning("chunk store full: serving fetched chunks from memory")
        return ok

    def _finish(
        self,
        want: _Want,
        *,
        data: bytes | None = None,
        exc: BaseException | None = None,
        cancel: bool = False,
    ) -> None:
        fut = want.future
        if self._inflight.get(want.chunk.digest) is fut:
            del self._inflight[want.chunk.digest]
            written = self._writes.pop(want.chunk.digest, None)
            if written is not None and not written.done():
                written.set_result(None)
        if fut.done():
            return
        if cancel:
            fut.cancel()
        elif exc is not None:
            fut.set_exception(exc)
        else:
            assert data is not None
            fut.set_result(data)
