"""LayerIndex built straight from TOC entries: tree rules, accessors, persistence."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest

from alsd.errors import FormatError
from alsd.oci.index_builder import build_index, parse_rfc3339_ns
from alsd.oci.layer_index import (
    EntryKind,
    LayerFormat,
    LayerIndex,
    normalize_name,
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(entries: list[dict[str, Any]], payload_end: int = 10_000) -> LayerIndex:
    return build_index(
        entries,
        format=LayerFormat.ESTARGZ,
        toc_digest="sha256:" + "0" * 64,
        verified=False,
        blob_size=payload_end + 100,
        payload_end=payload_end,
    )


ENTRIES: list[dict[str, Any]] = [
    {"name": "./", "type": "dir", "mode": 0o755, "modtime": "2024-01-02T03:04:05Z"},
    {"name": "./b/", "type": "dir", "mode": 0o40700, "uid": 1000, "gid": 100},
    {"name": "a/deep/f", "type": "reg", "size": 3, "offset": 100, "chunkDigest": sha(b"abc")},
    {
        "name": "big",
        "type": "reg",
        "size": 10,
        "offset": 200,
        "chunkSize": 4,
        "chunkDigest": sha(b"0123"),
        "modtime": "2024-01-02T03:04:05.5+01:00",
    },
    {
        "name": "big",
        "type": "chunk",
        "offset": 300,
        "chunkOffset": 4,
        "chunkSize": 4,
        "chunkDigest": sha(b"4567"),
    },
    {"name": "big", "type": "chunk", "offset": 400, "chunkOffset": 8, "chunkDigest": sha(b"89")},
    {"name": "link", "type": "symlink", "linkName": "a/deep/f"},
    {"name": "h1", "type": "hardlink", "linkName": "./a/deep/f"},
    {"name": "b/h2", "type": "hardlink", "linkName": "h1"},
    {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o666},
    {"name": "dev/fifo", "type": "fifo"},
    {"name": "b/.wh.gone", "type": "reg"},
    {"name": "b/.wh.kept", "type": "reg"},
    {"name": "b/kept", "type": "dir"},
    {"name": "opq/.wh..wh..opq", "type": "reg"},
    {
        "name": ".prefetch.landmark",
        "type": "reg",
        "size": 1,
        "offset": 150,
        "chunkDigest": sha(b"\x0f"),
    },
    {"name": "stargz.index.json", "type": "reg", "size": 5},
    {"name": "x", "type": "reg", "size": 0, "xattrs": {"user.a": "AAE="}},
    {"name": "x", "type": "reg", "size": 0, "xattrs": {"user.b": "Ag=="}},
]


@pytest.fixture
def index() -> LayerIndex:
    return build(ENTRIES)


def test_tree(index: LayerIndex) -> None:
    assert [n for n, _ in index.readdir(0)] == ["a", "b", "big", "dev", "h1", "link", "opq", "x"]
    assert index.lookup(0, ".prefetch.landmark") is None
    assert index.lookup(0, "stargz.index.json") is None
    assert index.lookup(0, "nope") is None
    a = index.find("a")
    assert a is not None
    implicit = index.attr(a)
    assert (implicit.kind, implicit.mode, implicit.mtime_ns) == (EntryKind.DIR, 0o755, 0)
    b = index.find("b")
    assert b is not None
    assert index.attr(b).mode == 0o700 and index.attr(b).uid == 1000
    assert [n for n, _ in index.readdir(b)] == ["gone", "h2", "kept"]
    assert index.readdir(b) != ["gone"] and index.readdir(b) != "gone"
    assert index.attr(index.find("b/gone") or 0).kind == EntryKind.WHITEOUT
    assert index.attr(index.find("b/kept") or 0).kind == EntryKind.DIR  # real entry wins
    assert index.attr(0).mtime_ns == 1704164645 * 10**9
    assert index.attr(0).nlink == 2 + 4  # ".", "..", and a, b, dev, opq
    assert index.path(index.find("dev/null") or 0) == "dev/null"


def test_hardlinks_share_the_node(index: LayerIndex) -> None:
    f = index.find("a/deep/f")
    assert f is not None
    assert index.find("h1") == f and index.find("b/h2") == f
    assert index.attr(f).nlink == 3
    assert index.path(f) == "h1"  # a hardlinked node is named by its shallowest name


def test_special_files(index: LayerIndex) -> None:
    null = index.attr(index.find("dev/null") or 0)
    assert (null.kind, null.rdev_major, null.rdev_minor, null.mode) == (EntryKind.CHAR, 1, 3, 0o666)
    assert index.attr(index.find("dev/fifo") or 0).kind == EntryKind.FIFO
    link = index.find("link")
    assert link is not None and index.readlink(link) == "a/deep/f"
    assert index.attr(link).size == 8
    opq = index.find("opq")
    assert opq is not None and index.xattrs(opq)["user.overlay.opaque"] == b"y"
    x = index.find("x")
    assert x is not None and index.xattrs(x) == {"user.b": b"\x02"}  # later entry replaced
    assert index.prefetch == "landmark" and index.prefetch_end == 150


def test_chunks(index: LayerIndex) -> None:
    big = index.find("big")
    assert big is not None
    chunks = index.chunks(big)
    assert [(c.file_offset, c.size, c.blob_offset, c.fetch_end) for c in chunks] == [
        (0, 4, 200, 300),
        (4, 4, 300, 400),
        (8, 2, 400, 10_000),  # the last payload's range runs to the TOC
    ]
    assert chunks[2].digest == sha(b"89")
    assert [c.file_offset for c in index.chunks_in_range(big, 3, 2)] == [0, 4]
    assert [c.file_offset for c in index.chunks_in_range(big, 8, 100)] == [8]
    assert index.chunks_in_range(big, 5, 0) == []
    f = index.find("a/deep/f")
    assert f is not None
    (only,) = index.chunks(f)
    assert (only.blob_offset, only.fetch_end) == (100, 150)  # bounded by the landmark
    offsets = [c.blob_offset for _, c in index.iter_chunks()]
    assert offsets == sorted(offsets) == [100, 200, 300, 400]
    assert index.chunks(index.find("link") or 0) == []
    assert index.chunk_count() == 4 and index.regular_file_count() == 3


@pytest.mark.parametrize(("start", "offsets"), [
    (0, [100, 200, 300, 400]), (100, [100, 200, 300, 400]), (101, [200, 300, 400]),
    (300, [300, 400]), (399, [400]), (401, []), (10**12, []),
])  # fmt: skip
def test_iter_chunks_from_a_blob_offset(index: LayerIndex, start: int, offsets: list[int]) -> None:
    got = list(index.iter_chunks(start))
    assert [c.blob_offset for _, c in got] == offsets
    every = list(index.iter_chunks())
    assert got == every[len(every) - len(got) :]  # the same (node, chunk) pairs, in order


def test_state_round_trip_through_msgpack(index: LayerIndex) -> None:
    packed = msgpack.packb(index.to_state(), use_bin_type=True)
    again = LayerIndex.from_state(msgpack.unpackb(packed, raw=False))
    assert again.node_count() == index.node_count()
    for node in range(index.node_count()):
        assert again.attr(node) == index.attr(node)
        assert again.chunks(node) == index.chunks(node)
        assert again.xattrs(node) == index.xattrs(node)
        assert again.readdir(node) == index.readdir(node)
    assert again.readlink(again.find("link") or 0) == "a/deep/f"
    assert (again.prefetch, again.prefetch_end, again.format) == ("landmark", 150, "estargz")
    with pytest.raises(FormatError):
        LayerIndex.from_state({"v": 99})
    broken = index.to_state()
    broken["cols"]["chunk_start"] = b""
    with pytest.raises(FormatError):
        LayerIndex.from_state(broken)


def test_empty_toc_has_a_root() -> None:
    index = build([])
    assert index.node_count() == 1 and index.readdir(0) == []
    assert index.attr(0).kind == EntryKind.DIR


@pytest.mark.parametrize(
    ("name", "norm"),
    [("./a/b/", "a/b"), ("a//b/./c", "a/b/c"), ("a/../b", "b"), ("./", ""), ("", "")],
)
def test_normalize_name(name: str, norm: str) -> None:
    assert normalize_name(name) == norm


@pytest.mark.parametrize("name", ["/etc", "..", "a/../../b", "a\x00b"])
def test_normalize_rejects(name: str) -> None:
    with pytest.raises(FormatError):
        normalize_name(name)


def test_rfc3339() -> None:
    assert parse_rfc3339_ns("") == 0
    assert parse_rfc3339_ns("0001-01-01T00:00:00Z") == 0
    assert parse_rfc3339_ns("1970-01-01T00:00:01.000000002Z") == 1_000_000_002
    assert parse_rfc3339_ns("1970-01-01T01:00:00+01:00") == 0
    with pytest.raises(FormatError):
        parse_rfc3339_ns("1970-13-45T00:00:00Z")


def test_shared_modtimes() -> None:
    t = "1970-01-01T00:00:01.5Z"
    index = build([{"name": n, "type": "dir", "modtime": t} for n in ("a", "b")])
    assert [index.attr(node).mtime_ns for _, node in index.readdir(0)] == [1_500_000_000] * 2
    bad = "1970-13-45T00:00:00Z"  # a bad modtime is reported for every entry that has it
    with pytest.raises(FormatError, match="'b'"):
        build([{"name": "a", "type": "dir"}, {"name": "b", "type": "dir", "modtime": bad}])
    with pytest.raises(FormatError, match="'a'"):
        build([{"name": "a", "type": "dir", "modtime": bad}, {"name": "b", "type": "dir"}])


def test_unicode_names_sort_by_bytes() -> None:
    index = build(
        # A lone surrogate too, and its neighbours: the builder sorts the str names, which
        # must give the order of their UTF-8 (surrogatepass) bytes.
        [
            {"name": n, "type": "dir"}
            for n in ("é", "z", "a", "\udc80", "\ud7ff", "\ue000", "\uffff", "\U0001f600")
        ]
    )
    names = [n for n, _ in index.readdir(0)]
    assert names == sorted(names, key=lambda s: s.encode("utf-8", "surrogatepass"))
    for n in names:
        assert index.lookup(0, n) is not None


def test_readdir_is_a_sliceable_view(index: LayerIndex) -> None:
    full = list(index.readdir(0))
    view = index.readdir(0)
    assert len(view) == len(full) == 8
    assert view == full and full == view
    assert view[0] == full[0] and view[-1] == full[-1] and view[3] == full[3]
    for sl in (slice(2, 5), slice(5, None), slice(None, -2), slice(7, 3), slice(20, None)):
        assert list(view[sl]) == full[sl], sl
    assert view[2:][1:3] == full[2:][1:3]
    assert list(view[::3]) == full[::3]
    for bad in (8, -9):
        with pytest.raises(IndexError):
            view[bad]
    with pytest.raises(TypeError):
        hash(view)
