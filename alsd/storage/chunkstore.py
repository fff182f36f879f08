"""Content-addressed store of uncompressed chunks on local disk, with LRU eviction.

The files (layout, recovery at open, reads and writes) are
:mod:`alsd.storage.chunkfiles`; this module keeps the bookkeeping and the async API.

A chunk is hashed *before* anything is written, written to ``tmp/`` and renamed into place,
so the final path only ever holds a complete file with the right content. The store is a
cache: a full or failing disk makes :meth:`ChunkStore.put` return False (one warning) and
the caller serves the bytes from memory.

Concurrency rule: every piece of bookkeeping (the LRU table and its byte total, the
reservation, pins, busy digests, counters) is owned by the event loop thread and changes
only between awaits. Worker threads (``asyncio.to_thread``) hash, read, write, rename and
unlink files; they get what they need as arguments and never touch the bookkeeping. One
exception: a read whose slice the page cache already holds is done on the loop thread
(``preadv`` with ``RWF_NOWAIT``, which never waits for the disk); a read that would wait
goes to a worker thread.
A digest in ``_busy`` has a file operation in flight (being written, or being unlinked as a
victim); puts of that digest wait for it, and eviction never picks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from alsd.errors import IntegrityError, StoreError
from alsd.storage.chunkfiles import HEX_RE, ChunkFiles, sha256_hex

log = logging.getLogger(__name__)

DIGEST_PREFIX = "sha256:"
# Below this size hashing in the loop is cheaper than a hop to a worker thread.
_INLINE_HASH_MAX = 64 * 1024


def chunk_hex(digest: str) -> str | None:
    """The 64 lowercase hex digits of a ``sha256:<hex>`` digest, or None if malformed."""
    if not digest.startswith(DIGEST_PREFIX):
        return None
    hx = digest[len(DIGEST_PREFIX) :]
    return hx if HEX_RE.fullmatch(hx) else None


class ChunkStore:
    """Uncompressed chunks keyed by ``sha256:<hex>``, bounded by ``max_bytes``.

    ``max_bytes`` counts chunk content bytes (file sizes), not filesystem blocks. The bound
    is never exceeded: if room cannot be made because everything left is pinned or being
    written, :meth:`put` declines (returns False) instead.

    ``verify_reads=True`` re-hashes every chunk read from disk. Without it, only chunks that
    may have been torn by an OS crash (see :meth:`open`) are re-hashed, once, on first read.
    """

    def __init__(self, root: Path, max_bytes: int, *, verify_reads: bool = False) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._root = Path(root)
        self._files = ChunkFiles(self._root)
        self._max = max_bytes
        self._verify_reads = verify_reads
        # hex -> size, least recently used first. With _total and _reserved this is the size
        # invariant; only _account_add/_account_remove/_reserve/_unreserve change them.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._reserved = 0
        # Bytes held for files kept outside the store under the same limit (materialised
        # layers): hold_outside/release_outside.
        self._outside = 0
        self._pins: dict[str, int] = {}
        self._busy: dict[str, asyncio.Event] = {}
        # Chunks that may be torn by an OS crash before their pages reached the disk.
        self._unverified: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock_fd: int | None = None
        self._opened = False
        self._closed = False
        self._failing = False  # a put failed and we warned; cleared by the next success
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._put_failures = 0
        self._put_declined = 0
        self._corrupt = 0
        self._cached_reads = 0  # reads served on the loop thread from the page cache

    # ------------------------------------------------------------------ properties

    @property
    def root(self) -> Path:
        return self._root

    @property
    def max_bytes(self) -> int:
        return self._max

    def path_for(self, digest: str) -> Path:
        """Final path of a chunk (whether or not it is stored); for messages and tests."""
        hx = chunk_hex(digest)
        if hx is None:
            raise ValueError(f"malformed chunk digest {digest!r}")
        return self._path(hx)

    def _path(self, hx: str) -> Path:
        return self._files.path(hx)

    # ------------------------------------------------------------------ size invariant

    def _check(self) -> None:
        # Cheap O(1) form of the invariant; check_invariants() does the full O(n) check.
        assert self._total >= 0 and self._reserved >= 0, (self._total, self._reserved)
        assert self._outside >= 0, self._outside
        used = self._total + self._reserved + self._outside
        assert used <= self._max, (self._total, self._reserved, self._outside, self._max)

    def _account_add(self, hx: str, size: int) -> None:
        assert hx not in self._lru, hx
        self._lru[hx] = size
        self._total += size
        self._check()

    def _account_remove(self, hx: str) -> int:
        size = self._lru.pop(hx)
        self._total -= size
        self._unverified.discard(hx)
        self._check()
        return size

    def _reserve(self, size: int) -> list[str] | None:
        """Make room for ``size`` more bytes by evicting LRU chunks; None if impossible.

        Victims leave the table at once (reads of them miss from now on) and are marked
        busy; the caller unlinks them in its worker thread and then clears the marks.
        """
        need = self._total + self._reserved + self._outside + size - self._max
        victims: list[str] = []
        if need > 0:
            freed = 0
            for hx, sz in self._lru.items():  # least recently used first
                if hx in self._pins or hx in self._busy:
                    continue
                victims.append(hx)
                freed += sz
                if freed >= need:
                    break
            if freed < need:
                return None
            for hx in victims:
                self._account_remove(hx)
                self._busy[hx] = asyncio.Event()
            self._evictions += len(victims)
        self._reserved += size
        self._check()
        return victims

    def _unreserve(self, size: int) -> None:
        self._reserved -= size
        self._check()

    async def hold_outside(self, size: int) -> bool:
        """Count ``size`` bytes kept outside the store (a materialised layer) against
        ``max_bytes``, evicting LRU chunks for room; False (nothing held) if impossible."""
        self._ensure_open()
        victims = self._reserve(size)
        if victims is None:
            return False
        self._reserved -= size
        self._outside += size
        for hx in victims:  # out of the table and busy already; unlinked in a thread
            self._spawn(self._unlink_later(hx))
        return True

    def release_outside(self, size: int) -> None:
        self._outside -= size  # held with hold_outside
        self._check()

    def demote(self, digests: Iterable[str]) -> None:
        """These chunks go first when room is needed (kept elsewhere now)."""
        for digest in digests:
            hx = chunk_hex(digest)
            if hx is not None and hx in self._lru:
                self._lru.move_to_end(hx, last=False)

    def check_invariants(self) -> None:
        """Full consistency check of the bookkeeping (O(n); for tests and debugging)."""
        assert self._total == sum(self._lru.values()), (self._total, sum(self._lru.values()))
        assert self._unverified <= self._lru.keys()
        assert all(n > 0 for n in self._pins.values())
        self._check()

    # ------------------------------------------------------------------ pinning

    def _pin(self, hx: str) -> None:
        self._pins[hx] = self._pins.get(hx, 0) + 1

    def _unpin(self, hx: str) -> None:
        n = self._pins[hx] - 1
        if n:
            self._pins[hx] = n
        else:
            del self._pins[hx]

    @contextlib.contextmanager
    def pinned(self, digest: str) -> Iterator[None]:
        """Keep ``digest`` from being evicted while the block runs (it need not be stored)."""
        hx = chunk_hex(digest)
        if hx is None:
            raise ValueError(f"malformed chunk digest {digest!r}")
        self._pin(hx)
        try:
            yield
        finally:
            self._unpin(hx)

    # ------------------------------------------------------------------ open / close

    async def open(self) -> None:
        """Create the layout, sweep ``tmp/`` and rebuild accounting and LRU order from disk.

        The scan runs in a worker thread (one stat per chunk). LRU order after a restart is
        the files' mtime order; reads refresh mtime at most once a minute. If the previous
        run did not close cleanly *and* the machine rebooted since (boot id differs), chunk
        files written without fsync may be torn, so every chunk is re-hashed on its first
        read. A mere process crash leaves the page cache intact and needs no re-check.
        """
        if self._opened:
            raise StoreError("chunk store already open")
        try:
            res = await asyncio.to_thread(self._files.open_sync, self._max)
        except OSError as exc:
            raise StoreError(f"cannot open chunk store at {self._root}: {exc}") from exc
        self._lock_fd = res.lock_fd
        for msg in res.warnings:
            log.warning("%s", msg)
        for hx, size in res.entries:
            self._lru[hx] = size
            self._total += size
        if not res.trusted:
            self._unverified = set(self._lru)
        self._check()
        self._evictions += res.evicted
        self._opened = True
        log.info(
            "chunk store %s: %d chunks, %d bytes (limit %d); swept %d tmp files, "
            "evicted %d, removed %d stray files%s",
            self._root,
            len(self._lru),
            self._total,
            self._max,
            res.swept,
            res.evicted,
            res.strays,
            "" if res.trusted else "; unclean shutdown across a reboot: chunks re-hashed on read",
        )

    async def close(self) -> None:
        """Finish pending writes, flush the filesystem and mark the store cleanly closed."""
        if not self._opened or self._closed:
            return
        self._closed = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.to_thread(self._files.close_sync)
        except OSError as exc:
            log.warning("chunk store %s: not marked clean at close: %s", self._root, exc)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _ensure_open(self) -> None:
        if not self._opened or self._closed:
            raise StoreError("chunk store is not open")

    # ------------------------------------------------------------------ queries

    def has(self, digest: str) -> bool:
        """True if the chunk is stored (a later get() may still miss if the file went bad)."""
        hx = chunk_hex(digest)
        return hx is not None and hx in self._lru

    def stats(self) -> dict[str, int]:
        return {
            "bytes": self._total,
            "count": len(self._lru),
            "max_bytes": self._max,
            "reserved": self._reserved,
            "outside_bytes": self._outside,
            "pinned": len(self._pins),
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "put_failures": self._put_failures,
            "put_declined": self._put_declined,
            "corrupt": self._corrupt,
            "unverified": len(self._unverified),
            "cached_reads": self._cached_reads,
        }

    # ------------------------------------------------------------------ get

    async def get(self, digest: str) -> bytes | None:
        """The chunk's bytes, or None if not stored or its file is missing/damaged.

        A file whose size differs from the recorded one, that cannot be read, or (when it
        must be re-hashed) whose content does not match, is deleted and reported as a miss.
        The chunk is pinned while its file is read, so eviction cannot remove it meanwhile.
        """
        return await self._read(digest, 0, None)

    async def get_range(self, digest: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of a stored chunk, or None like :meth:`get`.

        Reads just that slice (a 128 KiB FUSE read of a 4 MiB chunk must not copy the whole
        chunk). A chunk that must be re-hashed (``verify_reads``, or possibly torn by an OS
        crash) is read whole, verified, and then sliced. ``start`` and ``end`` are clamped
        to the chunk. The chunk is pinned while its file is read.
        """
        return await self._read(digest, start, end)

    async def _read(self, digest: str, start: int, end: int | None) -> bytes | None:
        """:meth:`get` (``end`` None) and :meth:`get_range`: one path for both."""
        self._ensure_open()
        hx = chunk_hex(digest)
        size = self._lru.get(hx) if hx is not None else None
        if hx is None or size is None:
            self._misses += 1
            return None
        self._lru.move_to_end(hx)
        start = max(0, start)
        end = size if end is None else min(end, size)
        verify = self._verify_reads or hx in self._unverified
        # A chunk that must be re-hashed is read whole whatever slice is asked for.
        lo, hi = (0, size) if verify else (start, end)
        if hi <= lo and (lo, hi) != (0, size):
            self._hits += 1
            return b""
        result: bytes | str | None = None
        if not verify and self._files.nowait:
            result = self._files.read_cached(hx, size, lo, hi)
            if result is not None:
                self._cached_reads += 1
        if result is None:
            self._pin(hx)
            try:
                result = await asyncio.to_thread(self._files.read_sync, hx, size, lo, hi, verify)
            finally:
                self._unpin(hx)
        if isinstance(result, str):
            self._drop_bad(hx, result)
            self._misses += 1
            return None
        self._unverified.discard(hx)
        self._hits += 1
        return result if (lo, hi) == (start, end) else result[start:end]

    def advise(self, digest: str) -> None:
        """Hint that a stored chunk will be read soon: start reading its file into the
        page cache in the background. Nothing happens if it is not stored."""
        hx = chunk_hex(digest)
        if hx is None or hx not in self._lru or self._closed:
            return
        self._spawn(asyncio.to_thread(self._files.advise_sync, hx))

    def _drop_bad(self, hx: str, reason: str) -> None:
        self._corrupt += 1
        log.warning("chunk store: discarding sha256:%s: %s", hx, reason)
        if hx not in self._lru or hx in self._busy:
            return  # a concurrent reader already dropped it
        self._account_remove(hx)
        self._busy[hx] = asyncio.Event()
        self._spawn(self._unlink_later(hx))

    async def _unlink_later(self, hx: str) -> None:
        try:
            await asyncio.to_thread(self._files.unlink_sync, [hx])
        finally:
            self._busy.pop(hx).set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ put

    async def put(self, digest: str, data: bytes) -> bool:
        """Store a chunk; True if it is stored now (or already was), False if not.

        Raises IntegrityError, writing nothing, if ``data`` does not hash to ``digest``.
        Returns False when the chunk cannot be stored: the disk is full or failing (one
        warning until a put succeeds again), the chunk is larger than the limit, or no room
        can be made because the remaining chunks are pinned. The caller then serves ``data``
        from memory. Cancelling the caller does not cancel the write: accounting stays
        exact because the commit runs as its own task.
        """
        self._ensure_open()
        hx = chunk_hex(digest)
        if hx is None:
            raise IntegrityError(f"malformed chunk digest {digest!r}")
        if len(data) <= _INLINE_HASH_MAX:
            actual = sha256_hex(data)
        else:
            actual = await asyncio.to_thread(sha256_hex, data)
        if actual != hx:
            raise IntegrityError(f"chunk {digest}: content hashes to {DIGEST_PREFIX}{actual}")
        while (ev := self._busy.get(hx)) is not None:
            await ev.wait()
        self._ensure_open()
        if hx in self._lru:
            self._lru.move_to_end(hx)
            return True
        size = len(data)
        victims = self._reserve(size)
        if victims is None:
            self._put_declined += 1
            log.debug(
                "chunk store: no room for %s (%d bytes; %d stored, limit %d)",
                digest,
                size,
                self._total,
                self._max,
            )
            return False
        self._busy[hx] = asyncio.Event()
        task = self._spawn(self._commit(hx, data, victims))
        result: bool = await asyncio.shield(task)
        return result

    async def _commit(self, hx: str, data: bytes, victims: list[str]) -> bool:
        size = len(data)
        err: OSError | None
        try:
            err = await asyncio.to_thread(self._files.write_sync, hx, data, victims)
        except BaseException:
            err = OSError(errno.EIO, "write interrupted")
            raise
        finally:
            self._unreserve(size)
            for v in victims:
                self._busy.pop(v).set()
            if err is None:
                self._account_add(hx, size)
            self._busy.pop(hx).set()
        if err is None:
            if self._failing:
                self._failing = False
                log.info("chunk store %s: storing chunks again", self._root)
            return True
        self._put_failures += 1
        if not self._failing:
            self._failing = True
            log.warning(
                "chunk store %s: cannot store chunks (%s); serving fetched data from memory "
                "until the disk recovers",
                self._root,
                err,
            )
        return False
