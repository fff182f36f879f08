"""The immutable, compact index of one lazily pullable layer (sans-I/O).

A :class:`LayerIndex` is what every format reader (eStargz, stargz, zstd:chunked) produces
from a TOC and what the engine and the FUSE layer consult: the directory tree, the
attributes of every node, and for every regular file the chunks to fetch and verify.

Storage is columnar so that an index of 100 000 entries stays well under 200 bytes per
entry: one ``array.array`` per attribute, names in one ``bytes`` blob, chunk digests as raw
32-byte strings in one ``bytes``.  :class:`NodeAttr` and :class:`Chunk` objects are made on
demand by the accessors.  Nodes are numbered breadth-first from the root (node 0); the
children of each directory are one contiguous run of "dirents", sorted by name bytes, so
``lookup`` is a binary search and ``readdir`` a slice.

Indexes are built from TOC entries by :func:`alsd.oci.index_builder.build_index`, and
restored from metadata by :meth:`LayerIndex.from_state`.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, overload

from alsd.errors import FormatError


class LayerFormat(StrEnum):
    ESTARGZ = "estargz"
    STARGZ = "stargz"
    ZSTD_CHUNKED = "zstd:chunked"


class EntryKind(IntEnum):
    DIR = 0
    REG = 1
    SYMLINK = 2
    HARDLINK = 3  # only in TOCs; hardlinks share the target's node and are never exposed
    CHAR = 4
    BLOCK = 5
    FIFO = 6
    WHITEOUT = 7  # overlay whiteout (char 0/0) made from ".wh.NAME"


@dataclass(frozen=True, slots=True)
class NodeAttr:
    kind: EntryKind
    mode: int  # permission bits incl. suid/sgid/sticky, no S_IFMT bits
    uid: int
    gid: int
    size: int  # REG: content size; SYMLINK: len(target.encode()); else 0
    mtime_ns: int
    nlink: int  # hardlinks share one node; nlink counts the names
    rdev_major: int
    rdev_minor: int


@dataclass(frozen=True, slots=True)
class Chunk:
    file_offset: int  # offset of this chunk inside the file
    size: int  # uncompressed length
    blob_offset: int  # start of the gzip member / zstd frame holding it
    inner_offset: int  # uncompressed bytes to skip in that member before the chunk
    fetch_end: int  # exclusive end of the compressed range [blob_offset, fetch_end)
    digest: str  # "sha256:<hex>" of the chunk's uncompressed bytes
    zeros: bool = False  # zstd:chunked "zeros" chunk: all zero bytes, nothing to fetch



NO_PARENT = 0xFFFFFFFF
_STATE_VERSION = 1
# Names are kept as bytes; surrogatepass lets a JSON "\udc80" escape round-trip.
NAME_ENCODING = "utf-8"
NAME_ERRORS = "surrogatepass"


# Typecodes of the columns; to_state() stores their bytes, so they are part of the format.
NODE_COLS = {
    "kind": "B",
    "mode": "H",
    "uid": "I",
    "gid": "I",
    "size": "q",
    "mtime": "q",
    "nlink": "I",
    "parent": "I",
    "name_ent": "I",
    "child_start": "I",
    "chunk_start": "I",
}
ENT_COLS = {"ent_node": "I", "name_off": "I"}
CHUNK_COLS = {"c_file_off": "q", "c_blob_off": "q", "c_inner": "q", "c_fetch_end": "q"}
LINK_COLS = {"link_nodes": "I", "link_off": "I"}


def normalize_name(name: str, *, what: str = "entry") -> str:
    """``path.Clean("/"+name)`` minus the leading "/", refusing names that escape the root.

    Returns "" for the root.  Absolute names and ".." that climbs above the root are
    rejected rather than silently clamped: a TOC that contains them is not what a honest
    producer writes, and clamping would alias two different names.
    """
    if name.startswith("/"):
        raise FormatError(f"{what} {name!r}: absolute name")
    if "\x00" in name:
        raise FormatError(f"{what} {name!r}: NUL byte in name")
    parts = name.split("/")
    if ".." not in parts:  # the common case: only "" and "." parts to drop
        return "/".join([part for part in parts if part and part != "."])
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                raise FormatError(f"{what} {name!r}: name escapes the root")
            out.pop()
            continue
        out.append(part)
    return "/".join(out)




class LayerIndex:
    """Immutable, compact, sans-I/O view of one layer's tree and chunks."""

    ROOT: ClassVar[int] = 0

    format: LayerFormat
    toc_digest: str
    verified: bool
    blob_size: int
    prefetch: str | None
    prefetch_end: int
    entry_count: int  # TOC entries (not counting "chunk" continuation entries)

    __slots__ = (
        "_blob_order",
        "_c_digest",
        "_c_zeros",
        "_cols",
        "_link_blob",
        "_names",
        "_rdev",
        "_xattrs",
        "blob_size",
        "entry_count",
        "format",
        "prefetch",
        "prefetch_end",
        "toc_digest",
        "verified",
    )

    def __init__(self) -> None:  # use build_index() or from_state()
        self._cols: dict[str, array[int]] = {}
        self._names = b""
        self._c_digest = b""
        self._c_zeros = b""
        self._link_blob = b""
        self._rdev: dict[int, tuple[int, int]] = {}
        self._xattrs: dict[int, dict[str, bytes]] = {}
        self._blob_order: array[int] | None = None

    # -- tree -------------------------------------------------------------------------

    def node_count(self) -> int:
        return len(self._cols["kind"])

    def _ent_name_bytes(self, ent: int) -> bytes:
        off = self._cols["name_off"]
        return self._names[off[ent] : off[ent + 1]]

    def _ent_name(self, ent: int) -> str:
        return self._ent_name_bytes(ent).decode(NAME_ENCODING, NAME_ERRORS)

    def _check_node(self, node: int) -> None:
        if not 0 <= node < len(self._cols["kind"]):
            raise KeyError(node)

    def lookup(self, parent: int, name: str) -> int | None:
        self._check_node(parent)
        cs = self._cols["child_start"]
        lo, hi = cs[parent], cs[parent + 1]
        try:
            key = name.encode(NAME_ENCODING, NAME_ERRORS)
        except UnicodeEncodeError:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            cur = self._ent_name_bytes(mid)
            if cur < key:
                lo = mid + 1
            elif cur > key:
                hi = mid
            else:
                return self._cols["ent_node"][mid]
        return None

    def readdir(self, parent: int) -> Sequence[tuple[str, int]]:
        """(name, node) of the children, sorted by name bytes: a lazy view, so that the
        kernel's many READDIR requests into a big directory each cost only their slice."""
        self._check_node(parent)
        cs = self._cols["child_start"]
        return _Dirents(self, cs[parent], cs[parent + 1])

    def attr(self, node: int) -> NodeAttr:
        self._check_node(node)
        c = self._cols
        major, minor = self._rdev.get(node, (0, 0))
        return NodeAttr(
            kind=EntryKind(c["kind"][node]),
            mode=c["mode"][node],
            uid=c["uid"][node],
            gid=c["gid"][node],
            size=c["size"][node],
            mtime_ns=c["mtime"][node],
            nlink=c["nlink"][node],
            rdev_major=major,
            rdev_minor=minor,
        )

    def readlink(self, node: int) -> str:
        self._check_node(node)
        nodes = self._cols["link_nodes"]
        i = bisect.bisect_left(nodes, node)
        if i == len(nodes) or nodes[i] != node:
            raise KeyError(f"node {node} is not a symlink")
        off = self._cols["link_off"]
        return self._link_blob[off[i] : off[i + 1]].decode(NAME_ENCODING, NAME_ERRORS)

    def xattrs(self, node: int) -> Mapping[str, bytes]:
        self._check_node(node)
        return dict(self._xattrs.get(node, {}))

    def path(self, node: int) -> str:
        self._check_node(node)
        parts: list[str] = []
        parent = self._cols["parent"]
        name_ent = self._cols["name_ent"]
        while node != self.ROOT:
            parts.append(self._ent_name(name_ent[node]))
            node = parent[node]
        return "/".join(reversed(parts))

    def parent(self, node: int) -> int:
        """The directory holding ``node`` (the root is its own parent)."""
        self._check_node(node)
        return self.ROOT if node == self.ROOT else self._cols["parent"][node]

    def find(self, path: str) -> int | None:
        try:
            norm = normalize_name(path)
        except FormatError:
            return None
        node: int | None = self.ROOT
        for part in norm.split("/") if norm else []:
            assert node is not None
            node = self.lookup(node, part)
            if node is None:
                return None
        return node

    # -- chunks -----------------------------------------------------------------------

    def _chunk(self, i: int, end_of_file: int) -> Chunk:
        c = self._cols
        file_off = c["c_file_off"][i]
        return Chunk(
            file_offset=file_off,
            size=end_of_file - file_off,
            blob_offset=c["c_blob_off"][i],
            inner_offset=c["c_inner"][i],
            fetch_end=c["c_fetch_end"][i],
            digest="sha256:" + self._c_digest[32 * i : 32 * i + 32].hex(),
            zeros=bool(self._c_zeros[i]),
        )

    def _chunk_range(self, node: int) -> tuple[int, int]:
        cs = self._cols["chunk_start"]
        return cs[node], cs[node + 1]

    def _chunk_end(self, node: int, i: int, last: int) -> int:
        # A chunk's size is not stored: it ends where the next chunk of the file starts.
        if i + 1 < last:
            return self._cols["c_file_off"][i + 1]
        return self._cols["size"][node]

    def chunks(self, node: int) -> Sequence[Chunk]:
        self._check_node(node)
        first, last = self._chunk_range(node)
        return [self._chunk(i, self._chunk_end(node, i, last)) for i in range(first, last)]

    def chunks_in_range(self, node: int, offset: int, size: int) -> Sequence[Chunk]:
        """The chunks of ``node`` that overlap ``[offset, offset+size)``, by file offset."""
        self._check_node(node)
        if size <= 0:
            return []
        first, last = self._chunk_range(node)
        offs = self._cols["c_file_off"]
        start = max(first, bisect.bisect_right(offs, offset, first, last) - 1)
        out: list[Chunk] = []
        for i in range(start, last):
            if offs[i] >= offset + size:
                break
            out.append(self._chunk(i, self._chunk_end(node, i, last)))
        return out

    def _order(self) -> array[int]:
        """Chunk numbers by blob offset (then inner offset), computed once, on first use."""
        if self._blob_order is None:
            blob_off = self._cols["c_blob_off"]
            inner = self._cols["c_inner"]
            self._blob_order = array(
                "I", sorted(range(len(blob_off)), key=lambda i: (blob_off[i], inner[i]))
            )
        return self._blob_order

    def iter_chunks(self, from_blob_offset: int = 0) -> Iterator[tuple[int, Chunk]]:
        """Every chunk with its node, ordered by blob offset (then inner offset); with
        ``from_blob_offset``, only those that start at or after it."""
        cs = self._cols["chunk_start"]
        blob_off = self._cols["c_blob_off"]
        order = self._order()
        start = 0
        if from_blob_offset > 0:
            start = bisect.bisect_left(order, from_blob_offset, key=lambda i: blob_off[i])
        for k in range(start, len(order)):
            i = order[k]
            node = bisect.bisect_right(cs, i) - 1
            _, last = self._chunk_range(node)
            yield node, self._chunk(i, self._chunk_end(node, i, last))

    def chunk_count(self) -> int:
        return len(self._cols["c_file_off"])

    def regular_file_count(self) -> int:
        return self._cols["kind"].tolist().count(EntryKind.REG)

    # -- persistence ------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """msgpack-friendly primitives only (int, str, bytes, list, dict, bool, None)."""
        return {
            "v": _STATE_VERSION,
            "byteorder": sys.byteorder,
            "format": str(self.format),
            "toc_digest": self.toc_digest,
            "verified": self.verified,
            "blob_size": self.blob_size,
            "prefetch": self.prefetch,
            "prefetch_end": self.prefetch_end,
            "entry_count": self.entry_count,
            "cols": {k: v.tobytes() for k, v in self._cols.items()},
            "names": self._names,
            "c_digest": self._c_digest,
            "c_zeros": self._c_zeros,
            "link_blob": self._link_blob,
            "rdev": [[n, ma, mi] for n, (ma, mi) in sorted(self._rdev.items())],
            "xattrs": [[n, dict(x)] for n, x in sorted(self._xattrs.items())],
        }

    @classmethod
    def from_columns(
        cls,
        *,
        format: LayerFormat,
        toc_digest: str,
        verified: bool,
        blob_size: int,
        prefetch: str | None,
        prefetch_end: int,
        entry_count: int,
        cols: dict[str, array[int]],
        names: bytes,
        c_digest: bytes,
        c_zeros: bytes,
        link_blob: bytes,
        rdev: dict[int, tuple[int, int]],
        xattrs: dict[int, dict[str, bytes]],
    ) -> LayerIndex:
        """An index from its columns (what :mod:`alsd.oci.index_builder` computes); the
        keys of ``cols`` are in the order of :meth:`to_state`'s ``"cols"``."""
        idx = cls()
        idx.format = format
        idx.toc_digest = toc_digest
        idx.verified = verified
        idx.blob_size = blob_size
        idx.prefetch = prefetch
        idx.prefetch_end = prefetch_end
        idx.entry_count = entry_count
        idx._cols = cols
        idx._names = names
        idx._c_digest = c_digest
        idx._c_zeros = c_zeros
        idx._link_blob = link_blob
        idx._rdev = rdev
        idx._xattrs = xattrs
        return idx

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LayerIndex:
        """Rebuild an index from :meth:`to_state` output; FormatError if it does not fit."""
        try:
            if state["v"] != _STATE_VERSION:
                raise FormatError(f"index state version {state['v']!r} not supported")
            idx = cls()
            idx.format = LayerFormat(state["format"])
            idx.toc_digest = str(state["toc_digest"])
            idx.verified = bool(state["verified"])
            idx.blob_size = int(state["blob_size"])
            idx.prefetch = state["prefetch"]
            idx.prefetch_end = int(state["prefetch_end"])
            idx.entry_count = int(state["entry_count"])
            swap = state["byteorder"] != sys.byteorder
            for name, code in {**NODE_COLS, **ENT_COLS, **CHUNK_COLS, **LINK_COLS}.items():
                a = array(code)
                a.frombytes(bytes(state["cols"][name]))
                if swap:
                    a.byteswap()
                idx._cols[name] = a
            idx._names = bytes(state["names"])
            idx._c_digest = bytes(state["c_digest"])
            idx._c_zeros = bytes(state["c_zeros"])
            idx._link_blob = bytes(state["link_blob"])
            idx._rdev = {int(n): (int(ma), int(mi)) for n, ma, mi in state["rdev"]}
            idx._xattrs = {
                int(n): {str(k): bytes(v) for k, v in x.items()} for n, x in state["xattrs"]
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"index state is malformed: {exc!r}") from exc
        n = len(idx._cols["kind"])
        if (
            len(idx._cols["child_start"]) != n + 1
            or len(idx._cols["chunk_start"]) != n + 1
            or len(idx._c_digest) != 32 * len(idx._cols["c_file_off"])
        ):
            raise FormatError("index state is malformed: column lengths disagree")
        return idx

    def __repr__(self) -> str:
        return (
            f"<LayerIndex {self.format} {self.toc_digest} nodes={self.node_count()} "
            f"chunks={self.chunk_count()}>"
        )


# -- building ---------------------------------------------------------------------------


class _Dirents(Sequence[tuple[str, int]]):
    """The dirents ``[start, end)`` of an index as (name, node), made on access."""

    __slots__ = ("_end", "_index", "_start")

    def __init__(self, index: LayerIndex, start: int, end: int) -> None:
        self._index = index
        self._start = start
        self._end = end

    def __len__(self) -> int:
        return self._end - self._start

    @overload
    def __getitem__(self, i: int) -> tuple[str, int]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[str, int]]: ...
    def __getitem__(self, i: int | slice) -> tuple[str, int] | Sequence[tuple[str, int]]:
        n = self._end - self._start
        if isinstance(i, slice):
            first, stop, step = i.indices(n)
            if step == 1:
                return _Dirents(self._index, self._start + first, self._start + max(first, stop))
            return [self[k] for k in range(first, stop, step)]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        ent = self._start + i
        return self._index._ent_name(ent), self._index._cols["ent_node"][ent]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # equal to a list, so unhashable like one

    def __repr__(self) -> str:
        return f"_Dirents({list(self)!r})"


