"""The files of the chunk store: layout, recovery at open, reads and writes of chunk files.

Layout under ``root`` (see developer-notes/storage.md)::

    chunks/sha256/<hex[:2]>/<hex>   one file per chunk, named by sha256 of its content
    tmp/<hex>.<random>              chunks being written; swept at open
    store-state                     "open <boot id>" while in use, "clean" after close
    lock                            flock(2)ed while open: one process per store

:class:`ChunkFiles` does the blocking file work for :class:`~alsd.storage.chunkstore.
ChunkStore` and keeps no bookkeeping: every method gets what it needs as arguments, and
all but :meth:`ChunkFiles.read_cached` run in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from alsd.errors import StoreError
from alsd.storage.durable import syncfs, write_durably

log = logging.getLogger("alsd.storage.chunkstore")

HEX_RE = re.compile(r"[0-9a-f]{64}")
# A read refreshes the file's mtime (the LRU order used after a restart) at most this often.
_TOUCH_INTERVAL_NS = 60 * 1_000_000_000
# preadv flag: fail with EAGAIN instead of waiting for the disk (Linux >= 4.14).
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_STATE_FILE = "store-state"
_LOCK_FILE = "lock"
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _boot_id() -> str | None:
    try:
        return _BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


def _willneed(fd: int, offset: int, length: int) -> None:
    """Start reading ``[offset, offset+length)`` (0 = to the end) into the page cache;
    does not wait for the disk. Only a hint: errors are ignored."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


@dataclass
class OpenResult:
    lock_fd: int
    entries: list[tuple[str, int]]  # (hex, size), least recently used first
    trusted: bool
    swept: int
    evicted: int
    strays: int = 0
    warnings: list[str] = field(default_factory=list)


class ChunkFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._chunk_dir = root / "chunks" / "sha256"
        self._tmp_dir = root / "tmp"
        # Cleared when the filesystem or kernel turns out not to support RWF_NOWAIT.
        self.nowait = _RWF_NOWAIT != 0

    def path(self, hx: str) -> Path:
        return self._chunk_dir / hx[:2] / hx

    def close_sync(self) -> None:
        """Flush the filesystem and mark the store cleanly closed."""
        syncfs(self.root)
        write_durably(self.root / _STATE_FILE, b"clean\n", mode=0o644, tmp_prefix=".")

    def open_sync(self, max_bytes: int) -> OpenResult:
        self.root.mkdir(parents=True, exist_ok=True)
        # Another process using the same store would have its tmp files swept and its
        # accounting silently wrong: refuse. The kernel drops the lock when a process dies.
        # Opened read-only: flock needs no write access, and an fd open for writing would
        # keep the filesystem from being remounted read-only.
        lock_fd = os.open(self.root / _LOCK_FILE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreError(f"chunk store {self.root} is in use by another process") from None
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            return self._open_locked(lock_fd, max_bytes)
        except BaseException:
            os.close(lock_fd)
            raise

    def _open_locked(self, lock_fd: int, max_bytes: int) -> OpenResult:
        warnings: list[str] = []
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._chunk_dir.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self._chunk_dir / f"{i:02x}").mkdir(exist_ok=True)

        swept = 0
        with os.scandir(self._tmp_dir) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    swept += 1
                except OSError as exc:
                    warnings.append(f"chunk store: cannot remove leftover {entry.path}: {exc}")

        state_path = self.root / _STATE_FILE
        try:
            state = state_path.read_text().split()
        except FileNotFoundError:
            state = []
        boot = _boot_id()
        trusted = state == ["clean"] or (
            len(state) == 2 and state[0] == "open" and boot is not None and state[1] == boot
        )
        # Durable before any chunk is written in this run: if the OS crashes from here on,
        # the next open sees "open <this boot>" with a new boot id and re-hashes.
        marker = f"open {boot or 'unknown'}\n".encode()
        write_durably(state_path, marker, mode=0o644, tmp_prefix=".")

        found: list[tuple[int, str, int]] = []
        strays = 0
        for i in range(256):
            prefix = f"{i:02x}"
            with os.scandir(self._chunk_dir / prefix) as it:
                for entry in it:
                    name = entry.name
                    if entry.is_file(follow_symlinks=False) and (
                        HEX_RE.fullmatch(name) and name.startswith(prefix)
                    ):
                        st = entry.stat(follow_symlinks=False)
                        found.append((st.st_mtime_ns, name, st.st_size))
                        continue
                    # Not something we wrote: a file that is not a chunk must not be trusted.
                    if not entry.is_dir(follow_symlinks=False):
                        try:
                            os.unlink(entry.path)
                            strays += 1
                        except OSError as exc:
                            warnings.append(f"chunk store: cannot remove stray {entry.path}: {exc}")
        found.sort()
        total = sum(size for _, _, size in found)
        evicted = 0
        start = 0
        # The limit may have been lowered since the last run: drop the oldest first.
        while total > max_bytes and start < len(found):
            _, hx, size = found[start]
            start += 1
            try:
                os.unlink(self.path(hx))
            except FileNotFoundError:
                pass
            except OSError as exc:
                warnings.append(f"chunk store: cannot evict {hx}: {exc}")
            total -= size
            evicted += 1
        entries = [(hx, size) for _, hx, size in found[start:]]
        return OpenResult(lock_fd, entries, trusted, swept, evicted, strays, warnings)

    def read_cached(self, hx: str, size: int, start: int, end: int) -> bytes | None:
        """On the loop thread: the slice when the page cache holds all of it and the file
        needs no bookkeeping (right size, touched recently), else None (a worker thread
        then reads it, waiting for the disk, and reports what is wrong). Never waits for
        the disk: ``preadv`` with ``RWF_NOWAIT``."""
        try:
            fd = os.open(self.path(hx), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size != size or time.time_ns() - st.st_mtime_ns > _TOUCH_INTERVAL_NS:
                return None
            buf = bytearray(end - start)
            n = os.preadv(fd, [buf], start, _RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self.nowait = False  # this filesystem or kernel cannot: stop trying
            return None  # EAGAIN: some of the slice is not in the page cache
        finally:
            os.close(fd)
        return bytes(buf) if n == len(buf) else None

    def read_sync(self, hx: str, size: int, start: int, end: int, verify: bool) -> bytes | str:
        """Read ``[start, end)`` of a chunk file (``verify``: the whole file, re-hashed);
        returns the bytes or a description of what is wrong."""
        path = self.path(hx)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return "file is missing"
        except OSError as exc:
            return f"cannot open: {exc}"
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                return f"file has {st.st_size} bytes, {size} recorded"
            want = end - start
            parts: list[bytes] = []
            got = 0
            while got < want:
                part = os.pread(fd, want - got, start + got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if len(data) != want:
                return f"short read: {len(data)} of {want} bytes at {start}"
            if verify and sha256_hex(data) != hx:
                return "content does not match its digest"
            if start == 0 and end < size:
                # Each read opens the file afresh, so the kernel sees no sequential
                # pattern and reads just the slice, synchronously. A read from the start
                # of a chunk usually goes on through it: ask for the rest now.
                _willneed(fd, end, size - end)
            if time.time_ns() - st.st_mtime_ns > _TOUCH_INTERVAL_NS:
                # Refresh the restart-time LRU order; failure (read-only fs) is harmless.
                with contextlib.suppress(OSError):
                    os.utime(fd)
            return data
        except OSError as exc:
            return f"read error: {exc}"
        finally:
            os.close(fd)

    def advise_sync(self, hx: str) -> None:
        try:
            fd = os.open(self.path(hx), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # evicted or gone meanwhile: only a hint
        try:
            _willneed(fd, 0, 0)
        finally:
            os.close(fd)

    def unlink_sync(self, hexes: list[str]) -> None:
        for hx in hexes:
            try:
                os.unlink(self.path(hx))
            except FileNotFoundError:
                pass
            except OSError as exc:
                # Left on disk, unaccounted; the next open() counts it again.
                log.warning("chunk store: cannot remove sha256:%s: %s", hx, exc)

    def write_sync(self, hx: str, data: bytes, victims: list[str]) -> OSError | None:
        # No fsync: chunks are a cache. A process crash keeps the page cache; an OS crash
        # is detected at the next open() (boot id) and then every chunk is re-hashed.
        self.unlink_sync(victims)
        tmp = self._tmp_dir / f"{hx}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            finally:
                os.close(fd)
            os.rename(tmp, self.path(hx))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return exc
        return None
