"""Materialised layers: a complete layer extracted into a plain directory.

Once every chunk of a layer is verified and stored, the layer can be served by the kernel
alone: its tree is extracted under ``<state_dir>/layers`` and the layer's ``diff`` becomes
a symbolic link to it (developer-notes/materialize.md). This module only builds, checks
and removes such directories; when to do it is the layer manager's business.

On disk (``root`` is 0700, so other local users reach nothing through it)::

    <root>/<key>/record        JSON + sha256 of it: TOC digest, entry and file counts, bytes
    <root>/<key>/diff/         the layer's tree in overlayfs lower form
    <root>/tmp/<key>.<random>/ a directory being built (a crash leaves only these)
    <root>/trash/<name>        a directory being removed

``key`` is the hex of the TOC digest (``layer_key``). A ``<root>/<key>`` exists only
complete: it is built aside in ``tmp/``, flushed with ``syncfs(2)``, and renamed into
place; ``open()`` empties ``tmp/`` and ``trash/``.

Extraction never follows a symbolic link the layer made: every name is created and
changed relative to a directory file descriptor opened with ``O_NOFOLLOW``, names are
single components, and nothing is opened by a path the layer could redirect.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from alsd.errors import StoreError
from alsd.oci.layer_index import Chunk, EntryKind, LayerIndex

log = logging.getLogger(__name__)

RECORD_NAME = "record"
TREE_NAME = "diff"
RECORD_VERSION = 1
# rootful overlayfs (what podman uses as root) reads trusted.overlay.opaque; the
# user.overlay.* twin that the FUSE tree also answers would show up as a plain xattr
# inside a container, which a layer pulled whole by containers/storage does not have.
_SKIPPED_XATTRS = frozenset({"user.overlay.opaque"})
_NICE = 19
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class MaterializeError(StoreError):
    """A layer could not be extracted, or a materialised directory failed a check."""


class ChunkSource(Protocol):
    """Where the extractor gets a chunk's bytes: already verified against its digest."""

    async def read_chunk(self, node: int, chunk: Chunk) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Record:
    """What a complete directory holds; compared with the tree by :meth:`LayerDirs.check`."""

    toc_digest: str
    format: str
    entries: int  # names below the root (each hardlink name counts, whiteouts count)
    files: int  # regular-file inodes
    file_bytes: int  # content bytes of those inodes (each counted once)
    built_ns: int  # when it was renamed into place (time.time_ns)

    def encode(self) -> bytes:
        body = json.dumps(self.to_obj(), sort_keys=True).encode()
        return body + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> Record:
        body, sep, rest = data.rpartition(b"\n")[0].rpartition(b"\n")
        if not sep or hashlib.sha256(body).hexdigest().encode() != rest:
            raise MaterializeError("record checksum mismatch (corrupt or truncated)")
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise MaterializeError(f"record does not decode: {exc}") from exc
        return cls.from_obj(obj)

    def to_obj(self) -> dict[str, object]:
        return {
            "v": RECORD_VERSION,
            "toc_digest": self.toc_digest,
            "format": self.format,
            "entries": self.entries,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "built_ns": self.built_ns,
        }

    @classmethod
    def from_obj(cls, obj: object) -> Record:
        if not isinstance(obj, dict) or obj.get("v") != RECORD_VERSION:
            raise MaterializeError("record of an unknown version")
        try:
            rec = cls(
                toc_digest=obj["toc_digest"],
                format=obj["format"],
                entries=obj["entries"],
                files=obj["files"],
                file_bytes=obj["file_bytes"],
                built_ns=obj["built_ns"],
            )
        except KeyError as exc:
            raise MaterializeError(f"record without {exc}") from exc
        ints = (rec.entries, rec.files, rec.file_bytes, rec.built_ns)
        if not isinstance(rec.toc_digest, str) or not isinstance(rec.format, str):
            raise MaterializeError("record with a non-string digest or format")
        if not all(isinstance(i, int) and i >= 0 for i in ints):
            raise MaterializeError("record with a bad count")
        return rec


@dataclass(frozen=True, slots=True)
class TreeSummary:
    entries: int
    files: int
    file_bytes: int


def layer_key(toc_digest: str) -> str:
    """The directory name of a layer: the TOC digest's hex, or a hash of any other form."""
    algo, _, hexpart = toc_digest.partition(":")
    if algo == "sha256" and _KEY_RE.match(hexpart):
        return hexpart
    return hashlib.sha256(toc_digest.encode("utf-8", "surrogatepass")).hexdigest()


def expected_summary(index: LayerIndex) -> TreeSummary:
    """Entry and file counts of the tree ``index`` describes (what an extraction makes)."""
    entries = 0
    seen: set[int] = set()
    file_bytes = 0
    stack = [LayerIndex.ROOT]
    while stack:
        node = stack.pop()
        for _name, child in index.readdir(node):
            entries += 1
            attr = index.attr(child)
            if attr.kind == EntryKind.DIR:
                stack.append(child)
            elif attr.kind == EntryKind.REG and child not in seen:
                seen.add(child)
                file_bytes += attr.size
    return TreeSummary(entries=entries, files=len(seen), file_bytes=file_bytes)


def scan_tree(tree: Path) -> TreeSummary:
    """Count what a directory holds, following no symbolic link (lstat only)."""
    st = os.lstat(tree)
    if not stat.S_ISDIR(st.st_mode):
        raise MaterializeError(f"{tree} is not a directory")
    entries = 0
    inodes: set[int] = set()
    file_bytes = 0
    stack = [str(tree)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                entries += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    est = entry.stat(follow_symlinks=False)
                    if est.st_ino not in inodes:
                        inodes.add(est.st_ino)
                        file_bytes += est.st_size
    return TreeSummary(entries=entries, files=len(inodes), file_bytes=file_bytes)


def _syncfs(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(name: str, index: LayerIndex, parent: int) -> None:
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise MaterializeError(f"layer entry {index.path(parent)!r}/{name!r}: unsafe name")


class _Extractor:
    """One extraction, run in one worker thread; chunk reads are sent to the event loop."""

    def __init__(
        self,
        index: LayerIndex,
        source: ChunkSource,
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
    ) -> None:
        self.index = index
        self.source = source
        self.loop = loop
        self.stop = stop
        self.first_name: dict[int, tuple[tuple[str, ...], str]] = {}  # hardlinked nodes
        self.bytes_written = 0

    # -- chunk reads, bridged to the loop ---------------------------------------------

    def _read(self, node: int, chunk: Chunk) -> bytes:
        fut = asyncio.run_coroutine_threadsafe(self.source.read_chunk(node, chunk), self.loop)
        while True:
            if self.stop.is_set():
                fut.cancel()
                raise MaterializeError("extraction stopped")
            try:
                data = fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                continue
            except concurrent.futures.CancelledError as exc:
                raise MaterializeError("extraction stopped (chunk read cancelled)") from exc
            break
        if len(data) != chunk.size:
            raise MaterializeError(
                f"{self.index.path(node)!r}: chunk at {chunk.file_offset} has "
                f"{len(data)} bytes, expected {chunk.size}"
            )
        return data

    # -- entries ----------------------------------------------------------------------

    def _xattrs(self, node: int, target: int | str) -> None:
        for key, value in sorted(self.index.xattrs(node).items()):
            if key in _SKIPPED_XATTRS:
                continue
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)

    def _regular(self, dfd: int, name: str, node: int) -> None:
        attr = self.index.attr(node)
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=dfd)
        try:
            for chunk in self.index.chunks(node):
                if chunk.zeros:
                    continue  # a hole; ftruncate below sets the size
                if self.stop.is_set():
                    raise MaterializeError("extraction stopped")
                data = self._read(node, chunk)
                view = memoryview(data)
                off = chunk.file_offset
                while view:
                    n = os.pwrite(fd, view, off)
                    view, off = view[n:], off + n
                self.bytes_written += len(data)
            os.ftruncate(fd, attr.size)
            # chown clears setuid/setgid and security.capability: xattrs and mode after it.
            os.fchown(fd, attr.uid, attr.gid)
            self._xattrs(node, fd)
            os.fchmod(fd, attr.mode)
            os.utime(fd, ns=(attr.mtime_ns, attr.mtime_ns))
        finally:
            os.close(fd)

    def _special(self, dfd: int, name: str, node: int) -> None:
        attr = self.index.attr(node)
        kind = attr.kind
        mode, uid, gid = attr.mode, attr.uid, attr.gid
        if kind == EntryKind.SYMLINK:
            os.symlink(self.index.readlink(node), name, dir_fd=dfd)
        elif kind == EntryKind.FIFO:
            os.mkfifo(name, 0o600, dir_fd=dfd)
        elif kind in (EntryKind.CHAR, EntryKind.BLOCK):
            fmt = stat.S_IFCHR if kind == EntryKind.CHAR else stat.S_IFBLK
            dev = os.makedev(attr.rdev_major, attr.rdev_minor)
            os.mknod(name, fmt | 0o600, dev, dir_fd=dfd)
        elif kind == EntryKind.WHITEOUT:
            # What containers/storage makes for ".wh.NAME" under rootful overlay: 0/0.
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dfd)
            mode = 0
        else:  # pragma: no cover - the index has no other kinds
            raise MaterializeError(f"{self.index.path(node)!r}: unexpected kind {kind!r}")
        os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
        if kind != EntryKind.WHITEOUT:
            # No *setxattr call takes a dir fd: name the entry through the directory's fd
            # in /proc, which resolves to the directory itself, never through the layer.
            self._xattrs(node, f"/proc/self/fd/{dfd}/{name}")
        if kind != EntryKind.SYMLINK:
            # The entry was just made by us in a directory only root can write (0700 base),
            # so following "name" cannot leave it: it is not a symbolic link.
            os.chmod(name, mode, dir_fd=dfd)
        os.utime(name, ns=(attr.mtime_ns, attr.mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def _finish_dir(self, fd: int, node: int) -> None:
        attr = self.index.attr(node)
        os.fchown(fd, attr.uid, attr.gid)
        self._xattrs(node, fd)
        os.fchmod(fd, attr.mode)
        os.utime(fd, ns=(attr.mtime_ns, attr.mtime_ns))

    def _open_path(self, root_fd: int, parts: tuple[str, ...]) -> int:
        fd = os.dup(root_fd)
        try:
            for part in parts:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _link(self, root_fd: int, dfd: int, name: str, node: int) -> None:
        parts, first = self.first_name[node]
        sfd = self._open_path(root_fd, parts)
        try:
            os.link(first, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(sfd)

    def run(self, root_fd: int) -> None:
        """Fill the empty directory ``root_fd`` with the layer's tree."""
        index = self.index
        # Depth-first; a directory's own attributes (mode, owner, xattrs, then mtime) are
        # applied after all its children, so the mtimes are final bottom-up.
        stack: list[tuple[int, int, tuple[str, ...], Iterator[tuple[str, int]]]] = [
            (LayerIndex.ROOT, os.dup(root_fd), (), iter(index.readdir(LayerIndex.ROOT)))
        ]
        try:
            while stack:
                node, dfd, parts, children = stack[-1]
                step = next(children, None)
                if step is None:
                    stack.pop()
                    try:
                        self._finish_dir(dfd, node)
                    finally:
                        os.close(dfd)
                    continue
                name, child = step
                _check_name(name, index, node)
                attr = index.attr(child)
                if attr.kind == EntryKind.DIR:
                    os.mkdir(name, 0o700, dir_fd=dfd)
                    cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                    stack.append((child, cfd, (*parts, name), iter(index.readdir(child))))
                elif attr.kind == EntryKind.REG:
                    if child in self.first_name:
                        self._link(root_fd, dfd, name, child)
                        continue
                    self._regular(dfd, name, child)
                    if attr.nlink > 1:
                        self.first_name[child] = (parts, name)
                else:
                    self._special(dfd, name, child)
        finally:
            for _, dfd, _, _ in stack:
                os.close(dfd)


class LayerDirs:
    """The materialised layers under ``root``: build, check, list, remove."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.trash = root / "trash"

    # -- paths ------------------------------------------------------------------------

    def layer_dir(self, toc_digest: str) -> Path:
        return self.root / layer_key(toc_digest)

    def tree(self, toc_digest: str) -> Path:
        """The directory ``diff`` points at once the layer is materialised."""
        return self.layer_dir(toc_digest) / TREE_NAME

    # -- start ------------------------------------------------------------------------

    def open(self) -> dict[str, Record]:
        """Create the layout, remove half-built and half-removed directories, and return
        the complete ones by key (their records read, their trees not yet checked).

        Blocking: call it in a thread. A directory without a readable record is removed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for d in (self.tmp, self.trash):
            d.mkdir(mode=0o700, exist_ok=True)
            for leftover in list(d.iterdir()):
                log.info("removing unfinished layer directory %s", leftover)
                _rmtree(leftover)
        out: dict[str, Record] = {}
        for entry in sorted(self.root.iterdir()):
            if entry.name in ("tmp", "trash"):
                continue
            if not _KEY_RE.match(entry.name) or not entry.is_dir() or entry.is_symlink():
                log.warning("removing %s: not a materialised layer", entry)
                self._discard(entry)
                continue
            try:
                rec = self._read_record(entry)
            except MaterializeError as exc:
                log.warning("removing materialised layer %s: %s", entry, exc)
                self._discard(entry)
                continue
            out[entry.name] = rec
        return out

    def _read_record(self, layer_dir: Path) -> Record:
        try:
            data = (layer_dir / RECORD_NAME).read_bytes()
        except OSError as exc:
            raise MaterializeError(f"record unreadable: {exc.strerror}") from exc
        rec = Record.decode(data)
        if layer_key(rec.toc_digest) != layer_dir.name:
            raise MaterializeError("record names another layer")
        return rec

    # -- check ------------------------------------------------------------------------

    def check(self, toc_digest: str, index: LayerIndex | None = None) -> Record:
        """Cheap checks of a complete directory; MaterializeError says what failed.

        The record must decode (checksummed) and name this TOC digest; the tree's entry
        count, regular-file count and content bytes (one lstat per entry) must equal the
        record's; with ``index``, the record must also equal what the index describes.
        Contents are not re-hashed (that would cost a full read of the layer).
        Blocking: call it in a thread.
        """
        layer_dir = self.layer_dir(toc_digest)
        rec = self._read_record(layer_dir)
        if rec.toc_digest != toc_digest:
            raise MaterializeError(f"record is for TOC {rec.toc_digest}, not {toc_digest}")
        if index is not None:
            want = expected_summary(index)
            have_rec = TreeSummary(rec.entries, rec.files, rec.file_bytes)
            if have_rec != want:
                raise MaterializeError(f"record {have_rec} does not match the index {want}")
        try:
            have = scan_tree(layer_dir / TREE_NAME)
        except OSError as exc:
            raise MaterializeError(f"tree unreadable: {exc}") from exc
        if have != TreeSummary(rec.entries, rec.files, rec.file_bytes):
            raise MaterializeError(
                f"tree holds {have.entries} entries, {have.files} files, "
                f"{have.file_bytes} bytes; record says {rec.entries}, {rec.files}, "
                f"{rec.file_bytes}"
            )
        return rec

    # -- build ------------------------------------------------------------------------

    async def build(self, index: LayerIndex, source: ChunkSource) -> Record:
        """Extract ``index`` into ``<root>/<key>`` (replacing what is there) and return its
        record. Runs in a thread of its own at the lowest CPU priority; the chunk reads
        run on this event loop. Cancelling stops the extraction and removes its files.
        """
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        done: asyncio.Future[Record] = loop.create_future()

        def worker() -> None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
            try:
                rec = self.build_sync(index, source, loop, stop)
            except BaseException as exc:  # handed to the awaiting task
                err = exc
                loop.call_soon_threadsafe(_set_exception, done, err)
            else:
                loop.call_soon_threadsafe(_set_result, done, rec)

        thread = threading.Thread(target=worker, name="alsd-materialize", daemon=True)
        thread.start()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            stop.set()
            # The worker removes its files before it reports; wait for that, but let a
            # second cancellation through.
            with contextlib.suppress(BaseException):
                await done
            raise

    def build_sync(
        self,
        index: LayerIndex,
        source: ChunkSource,
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
    ) -> Record:
        key = layer_key(index.toc_digest)
        for d in (self.tmp, self.trash):
            d.mkdir(parents=True, mode=0o700, exist_ok=True)
        work = self.tmp / f"{key}.{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        started = time.monotonic()
        try:
            (work / TREE_NAME).mkdir(mode=0o700)
            extractor = _Extractor(index, source, loop, stop)
            root_fd = os.open(work / TREE_NAME, _DIR_FLAGS)
            try:
                extractor.run(root_fd)
            finally:
                os.close(root_fd)
            summary = expected_summary(index)
            have = scan_tree(work / TREE_NAME)
            if have != summary:
                raise MaterializeError(f"extracted tree {have} differs from the index {summary}")
            rec = Record(
                toc_digest=index.toc_digest,
                format=str(index.format),
                entries=summary.entries,
                files=summary.files,
                file_bytes=summary.file_bytes,
                built_ns=time.time_ns(),
            )
            _write_durably(work / RECORD_NAME, rec.encode())
            fd = os.open(work, _DIR_FLAGS)
            try:
                _syncfs(fd)  # every file and directory of the tree, in one flush
            finally:
                os.close(fd)
            final = self.root / key
            if final.exists() or final.is_symlink():
                self._discard(final)
            os.rename(work, final)
            _fsync_dir(self.root)
            _fsync_dir(self.tmp)
        except BaseException:
            _rmtree(work)
            raise
        log.info(
            "materialised layer %s: %d entries, %d bytes written in %.1f s",
            index.toc_digest,
            summary.entries,
            extractor.bytes_written,
            time.monotonic() - started,
        )
        return rec

    # -- remove -----------------------------------------------------------------------

    def remove(self, toc_digest: str) -> bool:
        """Remove a layer's directory (rename aside first, so a crash never leaves a
        half-removed directory under its name). Blocking. False if there was none."""
        d = self.layer_dir(toc_digest)
        if not (d.exists() or d.is_symlink()):
            return False
        self._discard(d)
        return True

    def _discard(self, path: Path) -> None:
        self.trash.mkdir(parents=True, mode=0o700, exist_ok=True)
        aside = self.trash / f"{path.name}.{secrets.token_hex(4)}"
        try:
            os.rename(path, aside)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        _fsync_dir(self.root)
        _rmtree(aside)

    def keys(self) -> Sequence[str]:
        return sorted(e.name for e in self.root.iterdir() if _KEY_RE.match(e.name) and e.is_dir())


def _rmtree(path: Path) -> None:
    """Remove a file or tree without following links; directories may be read-only."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    shutil.rmtree(path, ignore_errors=False, onerror=_rm_error)


def _rm_error(func: object, path: str, exc_info: object) -> None:
    # As root nothing in the tree refuses deletion except an immutable flag, which the
    # extractor never sets; a vanished entry is fine.
    if not os.path.lexists(path):
        return
    raise MaterializeError(f"cannot remove {path}")


def _set_result(fut: asyncio.Future[Record], rec: Record) -> None:
    if not fut.done():
        fut.set_result(rec)


def _set_exception(fut: asyncio.Future[Record], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
