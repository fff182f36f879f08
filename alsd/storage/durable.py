"""The one durable-write sequence: temp file, fsync, rename, fsync of the directory.

Order matters: the data is fsynced before the rename (else a crash could leave the new
name pointing at an empty file), and the directory after it (else the rename itself may
be lost). A writer killed before the rename leaves only a temp file (named
``<tmp_prefix><name>.<random>``), which the owner of the directory sweeps.

Synchronous, blocking I/O: call it from a worker thread when on the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, *, mode: int = 0o600, tmp_prefix: str = ".tmp.") -> None:
    """Replace ``path`` with ``data`` atomically and durably; OSError on failure (the temp
    file is removed)."""
    tmp = path.with_name(f"{tmp_prefix}{path.name}.{secrets.token_hex(6)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (syncfs(2); falls back to sync(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    except (OSError, AttributeError):
        os.sync()
    finally:
        os.close(fd)
