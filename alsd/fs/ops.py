"""The thin ``pyfuse3.Operations`` adapter over :mod:`alsd.fs.tree` and the engine.

Every handler is wrapped by :func:`_handler`, the one place where exceptions become errno
values: ``FUSEError`` passes through; an :class:`~alsd.errors.AlsdError` becomes
``FUSEError(errno_for(exc))`` with one log line; anything else is logged with its
traceback and becomes EIO. The catch-all is not optional: pyfuse3's asyncio mode never
retrieves a handler task's exception, so an escaping exception leaves the kernel request,
and the process that made the syscall, hanging forever.

The protocol podman speaks (spec.md §1.4): a lookup of ``diff``, ``info`` or ``blob``
under ``<ref>/<digest>`` resolves the layer through the engine (a layer that cannot be
served answers ENOENT, and podman pulls it itself); ``use`` never exists, its CREATE
counts one use and answers ENOENT; RMDIR of ``<ref>/<digest>`` counts one release and
answers ENOENT. Everything else that would write answers EROFS.

Layer content never changes, so entries and attributes are cached by the kernel for a
long time and opened files keep their page cache.

Concurrency: handlers run as asyncio tasks on the event loop (at most ``max_tasks`` at a
time, see daemon.py); the tree is only touched between awaits, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from alsd.errors import AlsdError, NotLazyError, UnknownLayer, errno_for
from alsd.fs.tree import LAYER_NAMES, USE_NAME, Kind, LayerLike, Tree, check_digest_name

log = logging.getLogger(__name__)

# Layer content is immutable and the store's directories only gain children; the only
# answers that may change (a layer that could not be served) are errors, which the kernel
# does not cache (absent names inside diff/ are cached on purpose: see lookup). So a long
# timeout costs nothing and saves a round trip per path step.
CACHE_TIMEOUT_S = 3600.0
BLOCK_SIZE = 4096

P = ParamSpec("P")
R = TypeVar("R")


class EngineLike(Protocol):
    """The part of ``alsd.layers.manager.Engine`` the filesystem uses."""

    async def get_layer(self, ref: str, digest: str) -> Any: ...
    async def read(self, layer: Any, node: int, offset: int, size: int) -> bytes: ...
    async def read_blob(self, layer: Any, offset: int, size: int) -> bytes: ...
    def use(self, layer: Any) -> None: ...
    def release(self, layer: Any) -> None: ...


@dataclass
class FuseStats:
    """Request counters for /metrics (only touched on the event loop)."""

    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, errno name)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_read: Counter[str] = field(default_factory=Counter)  # by "diff" / "blob" / "info"
    uses: int = 0
    releases: int = 0
    negative_lookups: int = 0  # absent names in diff/, answered as cacheable negatives
    invalidations: int = 0  # layers whose diff entries were invalidated (materialised)


def _handler(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ops: Operations = args[0]  # type: ignore[assignment]
        t0 = time.monotonic()
        err: int | None = None
        task = asyncio.current_task()
        if task is not None:
            ops._inflight.add(task)
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            if not ops.stopping or task is None:
                raise
            # Cancelled by cancel_inflight() on the way out: answer, so the worker ends
            # and the syscall returns instead of waiting for a registry that may never
            # answer. The task itself goes on to pyfuse3's orderly exit.
            task.uncancel()
            err = errno.EIO
            log.info("%s: interrupted by shutdown, answering EIO", op)
            raise FUSEError(errno.EIO) from None
        except FUSEError as exc:
            err = exc.errno
            raise
        except AlsdError as exc:
            err = errno_for(exc)
            # ENOENT is podman's everyday "not here" (every gzip layer of every pull on
            # podman 4.3): debug. Anything else means a layer we should serve failed.
            level = logging.DEBUG if err == errno.ENOENT else logging.WARNING
            log.log(level, "%s: %s (%s)", op, exc, errno.errorcode.get(err, err))
            raise FUSEError(err) from None
        except Exception:
            err = errno.EIO
            log.exception("%s: unexpected error, answering EIO", op)
            raise FUSEError(errno.EIO) from None
        finally:
            if task is not None:
                ops._inflight.discard(task)
            ops.stats.requests[op] += 1
            ops.stats.seconds[op] = ops.stats.seconds.get(op, 0.0) + time.monotonic() - t0
            if err is not None:
                ops.stats.errors[(op, errno.errorcode.get(err, str(err)))] += 1

    return wrapper


def _negative_entry() -> pyfuse3.EntryAttributes:
    """A cacheable "no such name" (st_ino 0: the kernel keeps a negative dentry)."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = pyfuse3.InodeT(0)
    e.entry_timeout = CACHE_TIMEOUT_S
    return e


def _erofs() -> FUSEError:
    return FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers for the layer store. ``tree`` and ``engine`` are injected."""

    def __init__(self, tree: Tree, engine: EngineLike, *, resolve_timeout_s: float) -> None:
        super().__init__()
        self.tree = tree
        self.engine = engine
        self.resolve_timeout_s = resolve_timeout_s
        self.stats = FuseStats()
        self.stopping = False
        self._inflight: set[asyncio.Task[Any]] = set()
        # Called (on the event loop) once the kernel has taken our answer to FUSE INIT:
        # settings the kernel would overwrite during INIT go there (see daemon.py).
        self.after_init: Callable[[], None] | None = None

    def init(self) -> None:
        # pyfuse3 calls this while handling INIT, before answering it; call_soon runs the
        # hook after the answer was written (the kernel processes it in that write).
        if self.after_init is not None:
            asyncio.get_running_loop().call_soon(self.after_init)

    def cancel_inflight(self) -> int:
        """Make every request still being handled answer EIO now (shutdown only: after
        ``pyfuse3.terminate()`` no new request is read). Returns how many there were."""
        self.stopping = True
        tasks = list(self._inflight)
        for t in tasks:
            t.cancel()
        return len(tasks)

    def invalidate_diff(self, layer: LayerLike) -> None:
        """``diff`` of ``layer`` changed (it is a symlink to a local directory now): make
        the kernel forget the cached entry in every layer directory naming the layer, so
        that the next lookup (the next container's mount) gets the symlink. The old
        directory inode stays valid for the mounts that hold it."""
        for ino in self.tree.layer_dirs_of(layer):
            pyfuse3.invalidate_entry_async(
                pyfuse3.InodeT(ino), pyfuse3.FileNameT(b"diff"), ignore_enoent=True
            )
        self.stats.invalidations += 1

    def invalidate_toc(self, toc_digest: str) -> None:
        """The local directory of layers with this TOC digest was removed: make the
        kernel forget the ``diff`` entries (symlinks to it) of the layers it may cache."""
        for layer in self.tree.layers():
            if layer.index.toc_digest == toc_digest:
                self.invalidate_diff(layer)

    # -- helpers ------------------------------------------------------------------------
    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        a = self.tree.attr(ino)
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.InodeT(a.ino)
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT_S
        e.attr_timeout = CACHE_TIMEOUT_S
        e.st_mode = pyfuse3.ModeT(a.mode)
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = BLOCK_SIZE
        e.st_blocks = a.blocks
        e.st_atime_ns = a.mtime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.mtime_ns
        return e

    def _xattrs(self, ino: int) -> Mapping[str, bytes]:
        """A layer node's xattrs (overlay opaque markers); the store's own inodes have none."""
        t = self.tree.resolve(ino)
        if t.kind is Kind.DIFF and t.layer is not None:
            return t.layer.index.xattrs(t.node)
        return {}

    async def _layer(self, ref: str, digest: str) -> LayerLike:
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                layer: LayerLike = await self.engine.get_layer(ref, digest)
        except TimeoutError:
            # podman has no timeout of its own (spec.md §1.9): answer "not here" instead.
            raise UnknownLayer(
                f"{ref} {digest}: not resolved within {self.resolve_timeout_s:g}s"
            ) from None
        except (UnknownLayer, NotLazyError):
            raise
        except AlsdError as exc:
            # A layer we cannot serve (registry failure, corrupt or unverifiable TOC) is,
            # for containers/storage, simply not in this store: it pulls it the normal
            # way (issue 5). The engine has already told the admin why, once; answer
            # "not here" rather than EIO.
            raise UnknownLayer(f"{ref} {digest}: cannot be served lazily: {exc}") from exc
        return layer

    # -- lookups and attributes -----------------------------------------------------------
    @_handler
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(name)
        t = self.tree.resolve(parent_inode)
        if t.kind is Kind.ROOT:
            ino = self.tree.lookup_ref(n)
        elif t.kind is Kind.REF:
            ino = self.tree.lookup_digest(parent_inode, n)
        elif t.kind is Kind.LAYER_DIR:
            if n not in LAYER_NAMES:  # incl. "use": LOOKUP must fail so CREATE follows
                raise FUSEError(errno.ENOENT)
            layer = await self._layer(t.ref, t.digest)
            ino = self.tree.lookup_in_layer_dir(parent_inode, n, layer)
        elif t.kind is Kind.DIFF:
            found = self.tree.lookup_in_diff(parent_inode, n, parent=t)
            if found is None:
                # A layer's tree never changes: let the kernel remember the absence too.
                # Interpreters probe many names that do not exist (Python tries several
                # suffixes per import and path entry), each a round trip otherwise.
                self.stats.negative_lookups += 1
                return _negative_entry()
            ino = found
        else:
            raise FUSEError(errno.ENOTDIR)
        return self._entry(ino)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # Must never raise (pyfuse3 cannot even answer an error here).
        try:
            for ino, n in inode_list:
                self.tree.forget(ino, n)
        except Exception:
            log.exception("forget: unexpected error")

    @_handler
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(inode)

    @_handler
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    @_handler
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        t = self.tree.resolve(inode)
        if t.kind is Kind.DIFF_LINK and t.layer is not None and t.layer.diff_link is not None:
            return os.fsencode(t.layer.diff_link)
        if t.kind is not Kind.DIFF or t.layer is None:
            raise FUSEError(errno.EINVAL)
        if not stat.S_ISLNK(self.tree.attr(inode).mode):
            raise FUSEError(errno.EINVAL)
        return os.fsencode(t.layer.index.readlink(t.node))

    @_handler
    async def access(
        self, inode: pyfuse3.InodeT, mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext
    ) -> bool:
        # With default_permissions the kernel checks permissions itself; this only says
        # whether the inode exists and refuses write access.
        self.tree.resolve(inode)
        if mode & os.W_OK:
            raise _erofs()
        return True

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # overlayfs calls statfs on every lower layer and refuses the mount if it fails
        # (spec.md §1.13); the numbers themselves matter to nobody.
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories ----------------------------------------------------------------------
    @_handler
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if not stat.S_ISDIR(self.tree.attr(inode).mode):
            raise FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    @_handler
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        # "." and ".." first, as every Linux filesystem lists them (FUSE leaves them to
        # us; overlayfs passes them through for a directory only a lower layer has). The
        # kernel takes no reference for them in readdirplus, so they are not counted.
        # Offsets: 0 ".", 1 "..", 2 + i the i-th entry. tree.readdir is a lazy sequence,
        # so a request costs what it answers, not the size of the directory.
        if start_id < 2:
            dots = [(".", int(fh)), ("..", self.tree.parent(fh))]
            for i in range(start_id, 2):
                name, ino = dots[i]
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(ino), i + 1):
                    return
            start_id = 2
        entries = self.tree.readdir(fh)
        for i in range(start_id - 2, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(ino), i + 3):
                break
            self.tree.count(ino)  # readdirplus hands the kernel a reference, like lookup

    @_handler
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_handler
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        return None

    # -- files ----------------------------------------------------------------------------
    @_handler
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _erofs()
        t = self.tree.resolve(inode)
        if t.kind is Kind.DIFF:
            mode = self.tree.attr(inode).mode
            if not stat.S_ISREG(mode):
                raise FUSEError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL)
        elif t.kind is Kind.DIFF_LINK:
            raise FUSEError(errno.ELOOP)  # the kernel follows it; O_NOFOLLOW ends here
        elif t.kind not in (Kind.INFO, Kind.BLOB):
            raise FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), keep_cache=True)

    @_handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        t = self.tree.resolve(fh)
        layer = t.layer
        if layer is None:
            raise FUSEError(errno.EISDIR)
        if t.kind is Kind.INFO:
            data = t.content()[off : off + size]
            self.stats.bytes_read["info"] += len(data)
            return data
        if t.kind is Kind.BLOB:
            end = min(off + size, layer.index.blob_size)
            if off >= end:
                return b""
            data = await self.engine.read_blob(layer, off, end - off)
            self.stats.bytes_read["blob"] += len(data)
            return data
        # open() admits only regular files here, whose size is the index's: no second
        # tree.resolve/attr per read.
        end = min(off + size, layer.index.attr(t.node).size)
        if off >= end:
            return b""
        data = await self.engine.read(layer, t.node, off, end - off)
        self.stats.bytes_read["diff"] += len(data)
        return data

    @_handler
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_handler
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        return None

    @_handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        raise _erofs()

    # -- xattrs ---------------------------------------------------------------------------
    @_handler
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        value = self._xattrs(inode).get(os.fsdecode(name))
        if value is not None:
            return value
        # ENODATA, never ENOSYS: ENOSYS disables xattrs for the whole mount, and overlayfs
        # then misses opaque directories (spec.md §1.8).
        raise FUSEError(pyfuse3.ENOATTR)

    @_handler
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[bytes]:
        return [os.fsencode(k) for k in self._xattrs(inode)]

    @_handler
    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise _erofs()

    @_handler
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise _erofs()

    # -- the use / release protocol and refused writes ---------------------------------
    @_handler
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        t = self.tree.resolve(parent_inode)
        if t.kind is not Kind.LAYER_DIR or os.fsdecode(name) != USE_NAME:
            raise _erofs()
        try:
            layer = await self._layer(t.ref, t.digest)
        except AlsdError as exc:
            log.debug("use of %s %s not counted: %s", t.ref, t.digest, exc)
        else:
            self.engine.use(layer)
            self.stats.uses += 1
        # containers/storage expects ENOENT here: the use is counted, no file is made.
        raise FUSEError(errno.ENOENT)

    @_handler
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        t = self.tree.resolve(parent_inode)
        if t.kind is not Kind.REF:
            raise _erofs()
        digest = check_digest_name(os.fsdecode(name))
        try:
            layer = await self._layer(t.ref, digest)
        except AlsdError as exc:
            # After a restart podman releases layers we never saw used: nothing to count.
            log.debug("release of %s %s not counted: %s", t.ref, digest, exc)
        else:
            self.engine.release(layer)
            self.stats.releases += 1
        # containers/storage ignores ENOENT from the release notification.
        raise FUSEError(errno.ENOENT)

    @_handler
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    @_handler
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    @_handler
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    @_handler
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    @_handler
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        raise _erofs()

    @_handler
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise _erofs()
