"""Building a :class:`~alsd.oci.layer_index.LayerIndex` from decoded TOC entries (sans-I/O).

:func:`build_index` turns the TOC JSON entries (eStargz and zstd:chunked share the schema,
see developer-notes/protocol.md) into an index and rejects bad input with a
:class:`~alsd.errors.FormatError` that names the entry and the reason: names are
normalised, parents made, hardlinks resolved, whiteouts and opaque markers turned into
overlay whiteouts and xattrs, chunks sorted and checked to cover each file.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import calendar
import itertools
import re
from array import array
from collections.abc import Mapping
from typing import Any

from alsd.errors import FormatError
from alsd.oci.layer_index import (
    CHUNK_COLS,
    ENT_COLS,
    LINK_COLS,
    NAME_ENCODING,
    NAME_ERRORS,
    NO_PARENT,
    NODE_COLS,
    EntryKind,
    LayerFormat,
    LayerIndex,
    normalize_name,
)

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
TOC_TAR_NAME = "stargz.index.json"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")

# Module-level aliases for the builder's hot paths: on Python 3.11 ``EntryKind.DIR`` is a
# descriptor lookup, several times slower than a global.
_DIR = EntryKind.DIR
_REG = EntryKind.REG
_SYMLINK = EntryKind.SYMLINK
_HARDLINK = EntryKind.HARDLINK
_DEVICES = (EntryKind.CHAR, EntryKind.BLOCK)

_TYPES = {
    "dir": EntryKind.DIR,
    "reg": EntryKind.REG,
    "symlink": EntryKind.SYMLINK,
    "hardlink": EntryKind.HARDLINK,
    "char": EntryKind.CHAR,
    "block": EntryKind.BLOCK,
    "fifo": EntryKind.FIFO,
}


_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:\d\d)$"
)


def parse_rfc3339_ns(value: str, *, entry: str = "") -> int:
    """Nanoseconds since the epoch; "" and Go's zero time (year 1) mean unknown -> 0."""
    if not value:
        return 0
    m = _RFC3339.match(value)
    if m is None:
        raise FormatError(f"entry {entry!r}: bad modtime {value!r}")
    year_s, month, day, hh, mm, ss, frac, tz = m.groups()
    year = int(year_s)
    if year <= 1:
        return 0
    try:
        secs = calendar.timegm((year, int(month), int(day), int(hh), int(mm), int(ss), 0, 0, 0))
    except (ValueError, OverflowError) as exc:
        raise FormatError(f"entry {entry!r}: bad modtime {value!r}") from exc
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return secs * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)



_NO_XATTRS: dict[str, bytes] = {}
_NO_CHILDREN: dict[str, _Node] = {}
_NO_CHUNKS: list[tuple[int, int, int, int, bytes, bool]] = []


class _Node:
    """Temporary mutable node used only while building (discarded afterwards)."""

    __slots__ = (
        "children",
        "chunks",
        "end_offset",
        "gid",
        "implicit",
        "kind",
        "link",
        "mode",
        "mtime",
        "name",
        "nid",
        "nlink",
        "rdev",
        "size",
        "uid",
        "xattrs",
    )

    def __init__(self, kind: EntryKind, name: str) -> None:
        self.kind = kind
        self.name = name
        self.mode = 0o755
        self.uid = 0
        self.gid = 0
        self.size = 0
        self.mtime = 0
        self.nlink = 0
        self.rdev = (0, 0)
        self.link = ""
        # Shared while empty (most nodes): replaced, never mutated, when set.
        self.xattrs: dict[str, bytes] = _NO_XATTRS
        # Only directories have children and only regular files chunks; the others share
        # one empty (never mutated) container each, which keeps a big TOC's peak down.
        self.children: dict[str, _Node] = {} if kind == _DIR else _NO_CHILDREN
        # (file_off, size, blob_off, inner, digest32, zeros)
        self.chunks: list[tuple[int, int, int, int, bytes, bool]] = (
            [] if kind == _REG else _NO_CHUNKS
        )
        self.end_offset = -1
        self.implicit = False
        self.nid = -1  # number in the finished index, set by IndexBuilder.finish


def _int(e: Mapping[str, Any], key: str, name: str) -> int:
    v: object = e.get(key, 0)
    if type(v) is int:  # fast path; bool is a subclass of int, not int itself
        return v
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise FormatError(f"entry {name!r}: {key} is not an integer: {v!r}")
    return v


def _str(e: Mapping[str, Any], key: str, name: str) -> str:
    v = e.get(key, "")
    if type(v) is str:  # fast path
        return v
    if v is None:
        return ""
    if not isinstance(v, str):
        raise FormatError(f"entry {name!r}: {key} is not a string: {v!r}")
    return v


def _file_offset(chunk: tuple[int, int, int, int, bytes, bool]) -> int:
    return chunk[0]


def _digest32(value: str, name: str, key: str) -> bytes:
    if not value.startswith("sha256:") or len(value) != 71:
        raise FormatError(f"entry {name!r}: {key} {value!r} is not a sha256 digest")
    try:
        return bytes.fromhex(value[7:])
    except ValueError as exc:
        raise FormatError(f"entry {name!r}: {key} {value!r} is not a sha256 digest") from exc


def build_index(
    entries: Any,
    *,
    format: LayerFormat,
    toc_digest: str,
    verified: bool,
    blob_size: int,
    payload_end: int,
    max_chunk_bytes: int | None = None,
) -> LayerIndex:
    """Build a :class:`LayerIndex` from decoded TOC entries (a JSON list of objects).

    ``payload_end`` is where the file payloads end (the TOC's start): every chunk must lie
    in ``[0, payload_end)`` and a chunk's fetch range never goes beyond it.
    ``max_chunk_bytes`` (None: no limit) refuses a chunk that needs more uncompressed
    bytes than that to be decoded (its inner offset plus its size); "zeros" chunks are
    exempt: nothing is fetched or inflated for them.
    """
    if not isinstance(entries, list):
        raise FormatError("TOC: 'entries' is not a list")
    b = IndexBuilder(payload_end, max_chunk_bytes)
    for e in entries:
        b.add(e)
    return b.finish(format=format, toc_digest=toc_digest, verified=verified, blob_size=blob_size)


class IndexBuilder:
    """Builds a :class:`LayerIndex` from TOC entries handed over one at a time with
    :meth:`add` (so the caller need not hold them all), then :meth:`finish`."""

    def __init__(self, payload_end: int, max_chunk_bytes: int | None = None) -> None:
        self.payload_end = payload_end
        self.max_chunk_bytes = max_chunk_bytes
        self.root = _Node(_DIR, "")
        self.root.implicit = True
        self.last_reg: _Node | None = None
        self.last_reg_name = ""
        self.hardlinks: list[tuple[str, str, Mapping[str, Any]]] = []
        self.whiteouts: list[tuple[str, str, Mapping[str, Any]]] = []
        self.opaque: list[str] = []
        self.prefetch: str | None = None
        self.prefetch_end = 0
        self.entry_count = 0
        self.extra_starts: set[int] = set()
        # Many entries share a modtime: parse each distinct string once.
        self._mtimes: dict[str, int] = {}
        # Directory nodes by path.  A directory, once in the tree, is never replaced (only
        # non-directories are), so a hit is what walking from the root would find.
        self._dirs: dict[str, _Node] = {"": self.root}

    # walking/creating directories
    def _dir(self, path: str, full: str) -> _Node:
        node = self._dirs.get(path)
        if node is not None:
            return node
        node = self.root
        for part in path.split("/") if path else []:
            child = node.children.get(part)
            if child is None:
                child = _Node(_DIR, f"{node.name}/{part}" if node.name else part)
                child.implicit = True
                node.children[part] = child
            elif child.kind != _DIR:
                raise FormatError(f"entry {full!r}: parent {part!r} is not a directory")
            node = child
        self._dirs[path] = node
        return node

    def _lookup(self, path: str) -> _Node | None:
        node = self.root
        for part in path.split("/") if path else []:
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _attrs(self, node: _Node, e: Mapping[str, Any], name: str) -> None:
        mode = _int(e, "mode", name)
        if mode < 0:
            raise FormatError(f"entry {name!r}: negative mode")
        node.mode = mode & 0o7777  # some writers keep the S_IFMT bits in "mode"
        node.uid = _int(e, "uid", name)
        node.gid = _int(e, "gid", name)
        if node.uid < 0 or node.gid < 0 or node.uid > 0xFFFFFFFF or node.gid > 0xFFFFFFFF:
            raise FormatError(f"entry {name!r}: uid/gid out of range")
        modtime = _str(e, "modtime", name)
        mtime = self._mtimes.get(modtime)
        if mtime is None:
            mtime = self._mtimes[modtime] = parse_rfc3339_ns(modtime, entry=name)
        node.mtime = mtime
        xattrs = e.get("xattrs")
        if not xattrs:
            node.xattrs = _NO_XATTRS
            return
        if not isinstance(xattrs, dict):
            raise FormatError(f"entry {name!r}: xattrs is not an object")
        node.xattrs = {}
        for k, v in xattrs.items():
            if not isinstance(v, str):
                raise FormatError(f"entry {name!r}: xattr {k!r} is not a base64 string")
            try:
                node.xattrs[k] = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise FormatError(f"entry {name!r}: xattr {k!r} is not valid base64") from exc

    def add(self, e: Any) -> None:
        if not isinstance(e, dict):
            raise FormatError(f"TOC entry is not an object: {e!r:.80}")
        raw_name = e.get("name")
        typ = e.get("type")
        if not isinstance(raw_name, str) or not isinstance(typ, str):
            raise FormatError(f"TOC entry without a string name/type: {e!r:.120}")
        name = normalize_name(raw_name)
        if typ == "chunk":
            self._add_chunk(e, name, raw_name)
            return
        self.entry_count += 1
        kind = _TYPES.get(typ)
        if kind is None:
            raise FormatError(f"entry {raw_name!r}: unknown type {typ!r}")
        parent_path, _, base = name.rpartition("/")
        self.last_reg = None  # "chunk" entries continue only the reg entry just before
        if name == "":
            if kind != _DIR:
                raise FormatError(f"entry {raw_name!r}: the root must be a directory")
            self._attrs(self.root, e, raw_name)
            self.root.implicit = False
            return
        if parent_path == "" and base in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            # Landmarks are hidden; only their position matters (spec 3.6).
            off = _int(e, "offset", raw_name)
            if not 0 <= off <= self.payload_end:
                raise FormatError(f"entry {raw_name!r}: offset {off} outside the blob")
            self.extra_starts.add(off)  # its member bounds the previous payload's range
            if base == PREFETCH_LANDMARK:
                self.prefetch, self.prefetch_end = "landmark", off
            elif self.prefetch is None:
                self.prefetch, self.prefetch_end = "none", 0
            return
        if parent_path == "" and base == TOC_TAR_NAME:
            return
        if base == OPAQUE_MARKER:
            self._dir(parent_path, raw_name)
            self.opaque.append(parent_path)
            return
        if base.startswith(WHITEOUT_PREFIX):
            target = base[len(WHITEOUT_PREFIX) :]
            if target.startswith(WHITEOUT_PREFIX):
                # Other ".wh..wh." names are aufs bookkeeping (plnk, orph): not content.
                return
            if target in ("", ".", ".."):
                raise FormatError(f"entry {raw_name!r}: whiteout of an invalid name")
            self._dir(parent_path, raw_name)
            self.whiteouts.append((parent_path, target, e))
            return
        if kind == _HARDLINK:
            link = _str(e, "linkName", raw_name)
            if not link:
                raise FormatError(f"entry {raw_name!r}: hardlink without a target")
            self.hardlinks.append((name, normalize_name(link, what="hardlink target"), e))
            return
        parent = self._dir(parent_path, raw_name)
        node = parent.children.get(base)
        if node is not None:
            if node.kind != kind:
                raise FormatError(
                    f"entry {raw_name!r}: duplicate name with conflicting types "
                    f"({node.kind.name.lower()} and {typ})"
                )
            if kind != _DIR:
                # Like tar extraction: a later entry of the same type replaces the earlier.
                fresh = _Node(kind, name)
                parent.children[base] = node = fresh
            node.implicit = False
        else:
            node = _Node(kind, name)
            parent.children[base] = node
        self._attrs(node, e, raw_name)
        if kind == _SYMLINK:
            node.link = _str(e, "linkName", raw_name)
            node.size = len(node.link.encode(NAME_ENCODING, NAME_ERRORS))
        elif kind in _DEVICES:
            major, minor = _int(e, "devMajor", raw_name), _int(e, "devMinor", raw_name)
            if not (0 <= major <= 0xFFFFFFFF and 0 <= minor <= 0xFFFFFFFF):
                raise FormatError(f"entry {raw_name!r}: device numbers out of range")
            node.rdev = (major, minor)
        elif kind == _REG:
            size = _int(e, "size", raw_name)
            if size < 0:
                raise FormatError(f"entry {raw_name!r}: negative size")
            node.size = size
            end = e.get("endOffset")
            if end is not None:
                node.end_offset = _int(e, "endOffset", raw_name)
            self.last_reg, self.last_reg_name = node, name
            if size > 0:
                self._chunk_from(node, e, raw_name)

    def _add_chunk(self, e: Mapping[str, Any], name: str, raw_name: str) -> None:
        if self.last_reg is None:
            raise FormatError(f"entry {raw_name!r}: chunk without a preceding regular file")
        if name and name != self.last_reg_name:
            raise FormatError(
                f"entry {raw_name!r}: chunk does not belong to the preceding file "
                f"{self.last_reg_name!r}"
            )
        self._chunk_from(self.last_reg, e, raw_name)

    def _chunk_from(self, node: _Node, e: Mapping[str, Any], name: str) -> None:
        file_off = _int(e, "chunkOffset", name)
        size = _int(e, "chunkSize", name)
        if file_off < 0 or size < 0:
            raise FormatError(f"entry {name!r}: negative chunk offset or size")
        if size == 0:
            size = node.size - file_off  # 0 = "to the end of the file" (spec 3.3)
            if size <= 0:
                raise FormatError(f"entry {name!r}: chunk at {file_off} is beyond the file end")
        blob_off = _int(e, "offset", name)
        inner = _int(e, "innerOffset", name)
        if blob_off < 0 or inner < 0:
            raise FormatError(f"entry {name!r}: negative offset")
        if blob_off >= self.payload_end:
            raise FormatError(
                f"entry {name!r}: offset {blob_off} outside the blob's payload "
                f"(which ends at {self.payload_end})"
            )
        digest = _str(e, "chunkDigest", name)
        if not digest:
            # Single-chunk files may carry only the whole-file digest (spec 3.5, 4.1).
            if file_off != 0 or size != node.size:
                raise FormatError(f"entry {name!r}: chunk at {file_off} has no chunkDigest")
            digest = _str(e, "digest", name)
            if not digest:
                raise FormatError(f"entry {name!r}: chunk at {file_off} has no digest")
        zeros = _str(e, "chunkType", name) == "zeros"
        limit = self.max_chunk_bytes
        if limit is not None and not zeros and inner + size > limit:
            what = f"{size} bytes" if not inner else f"{size} bytes at inner offset {inner}"
            raise FormatError(
                f"entry {name!r}: chunk at {file_off} of {what} exceeds the chunk size "
                f"limit of {limit} bytes (max_chunk_bytes)"
            )
        node.chunks.append(
            (file_off, size, blob_off, inner, _digest32(digest, name, "digest"), zeros)
        )

    def _resolve(self) -> None:
        for name, target, _e in self.hardlinks:
            tnode = self._lookup(target)
            if tnode is None:
                raise FormatError(f"entry {name!r}: hardlink target {target!r} is missing")
            if tnode.kind != _REG:
                raise FormatError(
                    f"entry {name!r}: hardlink target {target!r} is a "
                    f"{tnode.kind.name.lower()}, not a regular file"
                )
            parent_path, _, base = name.rpartition("/")
            parent = self._dir(parent_path, name)
            existing = parent.children.get(base)
            if existing is not None and existing is not tnode:
                raise FormatError(f"entry {name!r}: duplicate name with conflicting types")
            parent.children[base] = tnode
        for parent_path, target, e in self.whiteouts:
            parent = self._dir(parent_path, parent_path)
            if target in parent.children:
                continue  # a real entry of this layer wins over its own whiteout
            wh = _Node(EntryKind.WHITEOUT, f"{parent_path}/{target}".lstrip("/"))
            self._attrs(wh, e, f"{parent_path}/.wh.{target}")
            wh.xattrs = _NO_XATTRS
            parent.children[target] = wh
        for path in self.opaque:
            d = self._dir(path, path)
            d.xattrs = {**d.xattrs, **dict.fromkeys(OPAQUE_XATTRS, b"y")}

    def _finish_chunks(self, nodes: list[_Node]) -> None:
        """Validate chunk coverage and overlap; compute fetch ends (spec 3.3/3.4, 4.1)."""
        starts: set[int] = {o for o in self.extra_starts if o > 0}
        members: dict[int, list[tuple[int, int, str]]] = {}
        for n in nodes:
            if n.kind != _REG:
                continue
            if len(n.chunks) > 1:
                n.chunks.sort(key=_file_offset)
            pos = 0
            for file_off, size, blob_off, inner, _, _ in n.chunks:
                if file_off < pos:
                    raise FormatError(f"entry {n.name!r}: overlapping chunks at {file_off}")
                if file_off > pos:
                    raise FormatError(
                        f"entry {n.name!r}: chunks do not cover the file ({pos}..{file_off})"
                    )
                pos = file_off + size
                starts.add(blob_off)
                members.setdefault(blob_off, []).append((inner, inner + size, n.name))
            if pos != n.size:
                raise FormatError(
                    f"entry {n.name!r}: chunks cover {pos} bytes of a {n.size}-byte file"
                )
            if (
                n.end_offset >= 0
                and n.chunks
                and not (n.chunks[-1][2] < n.end_offset <= self.payload_end)
            ):
                raise FormatError(
                    f"entry {n.name!r}: endOffset {n.end_offset} outside the blob's payload"
                )
        for spans in members.values():
            if len(spans) > 1:
                spans.sort()
                for (_, end, _), (start, _, name) in itertools.pairwise(spans):
                    if start < end:
                        raise FormatError(f"entry {name!r}: chunk overlaps another chunk")
        self._starts = sorted(starts)

    def finish(
        self, *, format: LayerFormat, toc_digest: str, verified: bool, blob_size: int
    ) -> LayerIndex:
        self._resolve()
        # Breadth-first numbering; each dir's children form one run of dirents.  A node's
        # number is its position in ``order``; hardlinks reach a node twice, so ``nid``
        # (-1 until numbered) keeps it from being numbered again.
        order: list[_Node] = [self.root]
        self.root.nid = 0
        parent_of: list[int] = [NO_PARENT]
        name_ent: list[int] = [NO_PARENT]
        child_count: list[int] = [0]
        ent_node: list[int] = []
        name_off: list[int] = [0]
        names = bytearray()
        for d_id, d in enumerate(order):  # ``order`` grows while it is walked: a BFS queue
            if d.kind != _DIR:
                continue
            children = d.children
            child_count[d_id] = len(children)
            # UTF-8 (with surrogatepass too) preserves code point order, so sorting the str
            # names sorts them by their bytes.
            for k in sorted(children):
                child = children[k]
                cid = child.nid
                if cid < 0:
                    cid = child.nid = len(order)
                    order.append(child)
                    parent_of.append(d_id)
                    name_ent.append(len(ent_node))
                    child_count.append(0)
                child.nlink += 1
                ent_node.append(cid)
                names += k.encode(NAME_ENCODING, NAME_ERRORS)
                name_off.append(len(names))
        self._finish_chunks(order)
        subdirs = [0] * len(order)
        for i in range(1, len(order)):
            if order[i].kind == _DIR:
                subdirs[parent_of[i]] += 1
        chunk_start: list[int] = []
        c_file_off: list[int] = []
        c_blob_off: list[int] = []
        c_inner: list[int] = []
        c_fetch_end: list[int] = []
        c_digest = bytearray()
        c_zeros = bytearray()
        link_nodes: list[int] = []
        link_off: list[int] = [0]
        link_blob = bytearray()
        rdev: dict[int, tuple[int, int]] = {}
        xattrs: dict[int, dict[str, bytes]] = {}
        starts = self._starts
        for i, node in enumerate(order):
            chunk_start.append(len(c_file_off))
            last = len(node.chunks) - 1
            for j, (file_off, _size, blob_off, inner, dig, zeros) in enumerate(node.chunks):
                c_file_off.append(file_off)
                c_blob_off.append(blob_off)
                c_inner.append(inner)
                if j == last and node.end_offset >= 0:
                    # c/storage records where the file's last frame ends.
                    c_fetch_end.append(node.end_offset)
                else:
                    # eStargz nextOffset: the next payload member start (or the TOC's start).
                    nxt = bisect.bisect_right(starts, blob_off)
                    c_fetch_end.append(starts[nxt] if nxt < len(starts) else self.payload_end)
                c_digest += dig
                c_zeros.append(1 if zeros else 0)
            if node.kind == _SYMLINK:
                link_nodes.append(i)
                link_blob += node.link.encode(NAME_ENCODING, NAME_ERRORS)
                link_off.append(len(link_blob))
            if node.rdev != (0, 0):
                rdev[i] = node.rdev
            if node.xattrs:
                xattrs[i] = node.xattrs
        chunk_start.append(len(c_file_off))
        node_values: dict[str, list[int]] = {
            "kind": [nd.kind for nd in order],
            "mode": [nd.mode for nd in order],
            "uid": [nd.uid for nd in order],
            "gid": [nd.gid for nd in order],
            "size": [nd.size for nd in order],
            "mtime": [nd.mtime for nd in order],
            "nlink": [
                2 + subdirs[i] if nd.kind == _DIR else nd.nlink for i, nd in enumerate(order)
            ],
            "parent": parent_of,
            "name_ent": name_ent,
            "child_start": list(itertools.accumulate(child_count, initial=0)),
            "chunk_start": chunk_start,
        }
        chunk_values = {
            "c_file_off": c_file_off,
            "c_blob_off": c_blob_off,
            "c_inner": c_inner,
            "c_fetch_end": c_fetch_end,
        }
        return LayerIndex.from_columns(
            format=format,
            toc_digest=toc_digest,
            verified=verified,
            blob_size=blob_size,
            prefetch=self.prefetch,
            prefetch_end=self.prefetch_end,
            entry_count=self.entry_count,
            cols={
                **{k: array(code, node_values[k]) for k, code in NODE_COLS.items()},
                **{k: array(code, chunk_values[k]) for k, code in CHUNK_COLS.items()},
                "ent_node": array(ENT_COLS["ent_node"], ent_node),
                "name_off": array(ENT_COLS["name_off"], name_off),
                "link_nodes": array(LINK_COLS["link_nodes"], link_nodes),
                    "link_off": array(LINK_COLS["link_off"], link_off),
            },
            names=bytes(names),
            c_digest=bytes(c_digest),
            c_zeros=bytes(c_zeros),
            link_blob=bytes(link_blob),
            rdev=rdev,
            xattrs=xattrs,
        )
