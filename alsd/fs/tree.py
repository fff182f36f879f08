"""The inode table of the Additional Layer Store layout (spec.md §1.3, §1.4, §2.2).

::

    <mount>/                      root, dir 0700 (root-only: no leak to other local users)
      <base64(ref)>/              dir 0500; name = base64 StdEncoding of a valid reference
        <digest>/                 dir 0500; name = sha256:<64 hex> (blob or TOC digest)
          diff/                   the layer root (LayerIndex node 0) and everything below
          info                    file 0400: the info JSON of the generation the name asks for
          blob                    file 0400: the compressed blob
          use                     never exists (LOOKUP -> ENOENT; CREATE counts a use)

Inode numbers are unique across the whole mount, because several layers of one image are
lower directories of one overlay mount on the same FUSE superblock:

- directories of the store itself ("meta" nodes: root, ref and digest dirs) take numbers
  below 2**32 (root = 1, the FUSE root inode);
- a layer with ``layer_no`` N owns ``[(N+1) << 32, (N+2) << 32)``: +1 the old-generation
  ``info``, +2 the new-generation ``info``, +3 ``blob``, +4+node the ``diff`` tree (+0:
  ``diff`` as a symlink once the layer is materialised, developer-notes/materialize.md), so
  hardlinks (one index node) share one inode and the numbers survive a restart as long as
  the engine keeps layer numbers.

Lookup counts: meta nodes are made on lookup and freed when the kernel forgets them; a layer
stays registered while the kernel holds any of its inodes, so a cached dentry never points
at a layer we no longer know.

Pure and synchronous; never imports pyfuse3 or the engine (layers are seen through the
:class:`LayerLike` protocol). Not thread-safe: only the event loop thread calls it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, overload

from alsd.errors import StoreError, UnknownLayer
from alsd.oci.layer_index import EntryKind, LayerIndex
from alsd.oci.reference import InvalidReference, parse_reference

ROOT_INODE = 1
_LAYER_SHIFT = 32
_META_LIMIT = 1 << _LAYER_SHIFT
_INFO_OLD = 1
_INFO_NEW = 2
_BLOB = 3
_DIFF_BASE = 4
_DIFF_LINK = 0  # ``diff`` of a materialised layer: a symlink to its local directory

_DIGEST_NAME = re.compile(r"sha256:[0-9a-f]{64}\Z")

# Layer contents never change; the store's own directories only gain children.
LAYER_NAMES = ("blob", "diff", "info")
USE_NAME = "use"

_KIND_FMT = {
    EntryKind.DIR: stat.S_IFDIR,
    EntryKind.REG: stat.S_IFREG,
    EntryKind.SYMLINK: stat.S_IFLNK,
    EntryKind.CHAR: stat.S_IFCHR,
    EntryKind.BLOCK: stat.S_IFBLK,
    EntryKind.FIFO: stat.S_IFIFO,
    # overlayfs whiteout: a character device 0/0 (spec.md §1.8)
    EntryKind.WHITEOUT: stat.S_IFCHR,
}


class LayerLike(Protocol):
    """What the tree needs from ``alsd.layers.manager.Layer``."""

    @property
    def ref(self) -> str: ...
    @property
    def blob_digest(self) -> str: ...
    @property
    def toc_digest(self) -> str: ...
    @property
    def index(self) -> LayerIndex: ...
    @property
    def layer_no(self) -> int: ...
    @property
    def info_old(self) -> bytes: ...
    @property
    def info_new(self) -> bytes: ...
    @property
    def diff_link(self) -> str | None: ...


class Kind(Enum):
    ROOT = "root"
    REF = "ref"
    LAYER_DIR = "layer-dir"
    INFO = "info"
    BLOB = "blob"
    DIFF = "diff"  # a node of a layer's tree (node 0 = diff/ itself)
    DIFF_LINK = "diff-link"  # ``diff`` of a materialised layer (a symlink)


@dataclass(frozen=True, slots=True)
class Attr:
    """What getattr answers (the FUSE adapter converts it to pyfuse3's type)."""

    ino: int
    mode: int  # including the S_IFMT bits
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime_ns: int

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(frozen=True, slots=True)
class Target:
    """What an inode designates."""

    kind: Kind
    ref: str = ""
    digest: str = ""
    layer: LayerLike | None = None
    node: int = -1  # for Kind.DIFF: the LayerIndex node

    def content(self) -> bytes:
        """The bytes of an ``info`` file."""
        assert self.layer is not None and self.kind is Kind.INFO
        return self.layer.info_old if self.digest == self.layer.blob_digest else self.layer.info_new


@dataclass(slots=True)
class _Meta:
    ino: int
    kind: Kind
    parent: int
    name: str
    ref: str = ""
    digest: str = ""
    lookups: int = 0
    children: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _LayerEntry:
    layer: LayerLike
    lookups: int = 0


def decode_ref_name(name: str) -> str:
    """The reference a directory name encodes; UnknownLayer if it encodes none.

    containers/storage names the directory ``base64.StdEncoding`` of the reference string
    (spec.md §1.3). A name that does not decode strictly, or that decodes to something that
    is not a valid reference, names no layer: ENOENT, which podman reads as "not here".
    """
    try:
        raw = base64.b64decode(name.encode("ascii"), validate=True)
        ref = raw.decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        raise UnknownLayer(f"{name!r} is not a base64-encoded image reference") from None
    if base64.b64encode(raw).decode("ascii") != name:  # non-canonical padding bits
        raise UnknownLayer(f"{name!r} is not a canonical base64 encoding")
    try:
        parse_reference(ref, default_tag=None)
    except InvalidReference as exc:
        raise UnknownLayer(f"{name!r} decodes to an invalid reference: {exc}") from None
    return ref


def encode_ref_name(ref: str) -> str:
    return base64.b64encode(ref.encode("utf-8")).decode("ascii")


def check_digest_name(name: str) -> str:
    if not _DIGEST_NAME.match(name):
        raise UnknownLayer(f"{name!r} is not a sha256:<64 hex> digest")
    return name


class Tree:
    """The inode table. ``uid``/``gid`` own the store's own directories and files."""

    def __init__(self, *, uid: int, gid: int, mtime_ns: int) -> None:
        self._uid = uid
        self._gid = gid
        self._mtime_ns = mtime_ns
        self._meta: dict[int, _Meta] = {ROOT_INODE: _Meta(ROOT_INODE, Kind.ROOT, ROOT_INODE, "")}
        self._next_meta = ROOT_INODE + 1
        self._layers: dict[int, _LayerEntry] = {}

    # -- numbering -------------------------------------------------------------------
    @staticmethod
    def _base(layer_no: int) -> int:
        return (layer_no + 1) << _LAYER_SHIFT

    def diff_inode(self, layer: LayerLike, node: int) -> int:
        return self._base(layer.layer_no) + _DIFF_BASE + node

    # -- lookups (each successful one counts one kernel reference) ------------------
    def lookup_ref(self, name: str) -> int:
        """Look up ``<base64(ref)>`` in the root."""
        root = self._meta[ROOT_INODE]
        ino = root.children.get(name)
        if ino is None:
            ref = decode_ref_name(name)
            ino = self._new_meta(Kind.REF, ROOT_INODE, name, ref=ref)
        self._meta[ino].lookups += 1
        return ino

    def lookup_digest(self, ref_ino: int, name: str) -> int:
        """Look up ``<digest>`` in a ref directory (no resolution: that happens at diff/info/
        blob, so that ``rmdir`` of a layer we do not know still reaches us)."""
        parent = self._meta_of(ref_ino, Kind.REF)
        ino = parent.children.get(name)
        if ino is None:
            check_digest_name(name)
            ino = self._new_meta(Kind.LAYER_DIR, ref_ino, name, ref=parent.ref, digest=name)
        self._meta[ino].lookups += 1
        return ino

    def layer_dir(self, ino: int) -> tuple[str, str]:
        """(reference, digest) of a layer directory inode."""
        m = self._meta_of(ino, Kind.LAYER_DIR)
        return m.ref, m.digest

    def ref_of(self, ino: int) -> str:
        return self._meta_of(ino, Kind.REF).ref

    def lookup_in_layer_dir(self, dir_ino: int, name: str, layer: LayerLike) -> int:
        """``diff``, ``info`` or ``blob`` of a resolved layer; registers the layer."""
        m = self._meta_of(dir_ino, Kind.LAYER_DIR)
        if m.digest not in (layer.blob_digest, layer.toc_digest):
            raise StoreError(f"engine answered {layer.blob_digest} for {m.digest}")  # a bug
        base = self._base(layer.layer_no)
        if name == "diff":
            # A materialised layer's diff is a symlink to its local directory (a new
            # inode: the directory inode stays valid for mounts that hold it).
            link = layer.diff_link is not None
            ino = base + (_DIFF_LINK if link else _DIFF_BASE + LayerIndex.ROOT)
        elif name == "blob":
            ino = base + _BLOB
        elif name == "info":
            old = m.digest == layer.blob_digest
            if not (layer.info_old if old else layer.info_new):
                # The engine could not make this generation's info (e.g. old generation,
                # unknown size and unknown_diff_size = "fallback"): podman pulls instead.
                raise UnknownLayer(f"{m.ref} {m.digest}: no info for this generation")
            ino = base + (_INFO_OLD if old else _INFO_NEW)
        else:
            raise UnknownLayer(f"{m.ref} {m.digest}: no {name!r} in a layer directory")
        self._count_layer(layer)
        return ino

    def lookup_in_diff(
        self, parent_ino: int, name: str, *, parent: Target | None = None
    ) -> int | None:
        """A name inside a layer's tree (None: no such entry). ``parent``: what
        ``resolve(parent_ino)`` answered, when the caller already has it."""
        t = self.resolve(parent_ino) if parent is None else parent
        if t.kind is not Kind.DIFF or t.layer is None:
            raise UnknownLayer(f"inode {parent_ino} is not a directory of a layer")
        node = t.layer.index.lookup(t.node, name)
        if node is None:
            return None
        self._count_layer(t.layer)
        return self.diff_inode(t.layer, node)

    def count(self, ino: int) -> None:
        """One more kernel reference to an inode handed out by :meth:`readdir`
        (readdirplus counts like a lookup)."""
        if ino < _META_LIMIT:
            m = self._meta.get(ino)
            if m is not None:
                m.lookups += 1
            return
        entry = self._layers.get((ino >> _LAYER_SHIFT) - 1)
        if entry is not None:
            entry.lookups += 1

    def _count_layer(self, layer: LayerLike) -> None:
        entry = self._layers.get(layer.layer_no)
        if entry is None or entry.layer is not layer:
            # A new layer, or the engine re-opened one it had dropped: same numbers,
            # same content, so the kernel's cached inodes stay right.
            prev = entry.lookups if entry is not None else 0
            entry = self._layers[layer.layer_no] = _LayerEntry(layer, prev)
        entry.lookups += 1

    def _new_meta(self, kind: Kind, parent: int, name: str, *, ref: str, digest: str = "") -> int:
        ino = self._next_meta
        if ino >= _META_LIMIT:
            raise StoreError("store directory inode numbers exhausted; restart alsd")
        self._next_meta += 1
        self._meta[ino] = _Meta(ino, kind, parent, name, ref=ref, digest=digest)
        self._meta[parent].children[name] = ino
        return ino

    def _meta_of(self, ino: int, kind: Kind) -> _Meta:
        m = self._meta.get(ino)
        if m is None or m.kind is not kind:
            raise UnknownLayer(f"inode {ino} is not a {kind.value} directory")
        return m

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references to ``ino``."""
        if ino < _META_LIMIT:
            m = self._meta.get(ino)
            if m is None or ino == ROOT_INODE:
                return
            m.lookups -= nlookup
            if m.lookups <= 0 and not m.children:
                del self._meta[ino]
                parent = self._meta.get(m.parent)
                if parent is not None and parent.children.get(m.name) == ino:
                    del parent.children[m.name]
            return
        entry = self._layers.get((ino >> _LAYER_SHIFT) - 1)
        if entry is not None:
            entry.lookups -= nlookup
            if entry.lookups <= 0:
                del self._layers[entry.layer.layer_no]

    # -- what an inode is --------------------------------------------------------------
    def resolve(self, ino: int) -> Target:
        if ino < _META_LIMIT:
            m = self._meta.get(ino)
            if m is None:
                raise UnknownLayer(f"inode {ino} is unknown")
            return Target(m.kind, m.ref, m.digest)
        entry = self._layers.get((ino >> _LAYER_SHIFT) - 1)
        if entry is None:
            raise UnknownLayer(f"inode {ino} belongs to no known layer")
        layer = entry.layer
        low = ino & (_META_LIMIT - 1)
        if low == _INFO_OLD:
            return Target(Kind.INFO, layer.ref, layer.blob_digest, layer)
        if low == _INFO_NEW:
            return Target(Kind.INFO, layer.ref, layer.toc_digest, layer)
        if low == _BLOB:
            return Target(Kind.BLOB, layer.ref, layer.blob_digest, layer)
        if low == _DIFF_LINK:
            if layer.diff_link is None:
                raise UnknownLayer(f"inode {ino}: layer {layer.blob_digest} has no local copy")
            return Target(Kind.DIFF_LINK, layer.ref, layer.blob_digest, layer)
        node = low - _DIFF_BASE
        if not 0 <= node < layer.index.node_count():
            raise UnknownLayer(f"inode {ino} is not a node of layer {layer.blob_digest}")
        return Target(Kind.DIFF, layer.ref, layer.blob_digest, layer, node)

    def attr(self, ino: int) -> Attr:
        t = self.resolve(ino)
        if t.kind in (Kind.ROOT, Kind.REF, Kind.LAYER_DIR):
            # Root-only at the top: whatever the mount options, the kernel
            # (default_permissions) keeps other local users out of private layers.
            mode = stat.S_IFDIR | (0o700 if t.kind is Kind.ROOT else 0o500)
            return Attr(ino, mode, 2, self._uid, self._gid, 0, 0, self._mtime_ns)
        assert t.layer is not None
        if t.kind is Kind.INFO:
            size = len(t.content())
            return Attr(ino, stat.S_IFREG | 0o400, 1, self._uid, self._gid, size, 0, self._mtime_ns)
        if t.kind is Kind.DIFF_LINK:
            size = len(os.fsencode(t.layer.diff_link or ""))
            return Attr(ino, stat.S_IFLNK | 0o777, 1, self._uid, self._gid, size, 0, self._mtime_ns)
        if t.kind is Kind.BLOB:
            size = t.layer.index.blob_size
            return Attr(ino, stat.S_IFREG | 0o400, 1, self._uid, self._gid, size, 0, self._mtime_ns)
        a = t.layer.index.attr(t.node)
        if a.kind is EntryKind.WHITEOUT:
            mode, rdev, size = stat.S_IFCHR, 0, 0
        else:
            mode = _KIND_FMT[a.kind] | (a.mode & 0o7777)
            rdev = (
                makedev(a.rdev_major, a.rdev_minor)
                if a.kind in (EntryKind.CHAR, EntryKind.BLOCK)
                else 0
            )
            size = a.size
        return Attr(ino, mode, max(a.nlink, 1), a.uid, a.gid, size, rdev, a.mtime_ns)

    def readdir(self, ino: int) -> Sequence[tuple[str, int]]:
        """Entries of a directory, sorted, without ``.`` and ``..`` (no lookup counted)."""
        t = self.resolve(ino)
        if t.kind in (Kind.ROOT, Kind.REF):
            m = self._meta[ino]
            return sorted(m.children.items())
        if t.kind is Kind.LAYER_DIR:
            # Resolution happens on lookup; listing shows the layer once it is known.
            for entry in self._layers.values():
                la = entry.layer
                if la.ref == t.ref and t.digest in (la.blob_digest, la.toc_digest):
                    base = self._base(la.layer_no)
                    info = _INFO_OLD if t.digest == la.blob_digest else _INFO_NEW
                    diff = _DIFF_LINK if la.diff_link is not None else _DIFF_BASE
                    return [
                        ("blob", base + _BLOB),
                        ("diff", base + diff),
                        ("info", base + info),
                    ]
            return []
        if t.kind is Kind.DIFF and t.layer is not None:
            # Lazy: the kernel reads a big directory in many requests, each at an offset;
            # building the whole list per request made listing n entries cost n².
            return _DiffEntries(t.layer.index.readdir(t.node), self.diff_inode(t.layer, 0))
        raise UnknownLayer(f"inode {ino} is not a directory")

    def parent(self, ino: int) -> int:
        """The inode ``..`` names in a listing of directory ``ino`` (readdir's d_ino only:
        the kernel resolves ``..`` itself). The root is its own parent; so is a layer's
        ``diff`` root, whose layer directory depends on the name it was reached by."""
        t = self.resolve(ino)
        if t.kind is not Kind.DIFF:
            return self._meta[ino].parent
        assert t.layer is not None
        path = t.layer.index.path(t.node)
        if not path:
            return ino
        node = t.layer.index.find(path.rpartition("/")[0])
        return ino if node is None else self.diff_inode(t.layer, node)

    def layer_dirs_of(self, layer: LayerLike) -> list[int]:
        """The ``<ref>/<digest>`` directory inodes that name ``layer`` (by its blob or
        TOC digest), for invalidating their cached ``diff`` entries."""
        return [
            m.ino
            for m in self._meta.values()
            if m.kind is Kind.LAYER_DIR
            and m.ref == layer.ref
            and m.digest in (layer.blob_digest, layer.toc_digest)
        ]

    def layers(self) -> list[LayerLike]:
        return [e.layer for e in self._layers.values()]


class _DiffEntries(Sequence[tuple[str, int]]):
    """A layer directory's (name, node) dirents seen as (name, inode), made on access."""

    __slots__ = ("_dirents", "_ino0")

    def __init__(self, dirents: Sequence[tuple[str, int]], ino0: int) -> None:
        self._dirents = dirents
        self._ino0 = ino0  # the inode of node 0 (nodes are numbered contiguously)

    def __len__(self) -> int:
        return len(self._dirents)

    @overload
    def __getitem__(self, i: int) -> tuple[str, int]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[str, int]]: ...
    def __getitem__(self, i: int | slice) -> tuple[str, int] | Sequence[tuple[str, int]]:
        if isinstance(i, slice):
            return _DiffEntries(self._dirents[i], self._ino0)
        name, node = self._dirents[i]
        return name, self._ino0 + node

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # equal to a list, so unhashable like one


def makedev(major: int, minor: int) -> int:
    """Linux's new_encode_dev layout, as the kernel expects in st_rdev from FUSE."""
    return ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & ~0xFF) << 12)
