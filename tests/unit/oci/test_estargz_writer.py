"""The eStargz writer against the Go builder's output, its own reader round trip, and the
ctr-remote fixtures.

Reference blobs in tests/data/estargz were written once by stargz-snapshotter's Go
``estargz.Build`` (tests/data/estargz/README.md); Go is not needed to run these tests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alsd.errors import FormatError
from alsd.oci import formats
from alsd.oci.estargz_writer import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    EstargzResult,
    layer_annotations,
    layer_descriptor,
    write_estargz,
)
from alsd.oci.layer_index import EntryKind, LayerFormat, LayerIndex
from tests.support.oci_layout import OciLayout

DATA = Path(__file__).resolve().parents[2] / "data" / "estargz"
REFS: list[dict[str, Any]] = json.loads((DATA / "refs.json").read_text())


# --------------------------------------------------------------------------------------
# helpers


@dataclass
class Member:
    offset: int
    header: bytes  # the 10-byte gzip header
    data: bytes  # uncompressed content


def split_members(blob: bytes) -> list[Member]:
    out: list[Member] = []
    pos = 0
    while pos < len(blob):
        d = zlib.decompressobj(31)
        data = d.decompress(blob[pos:])
        assert d.eof, f"truncated gzip member at {pos}"
        out.append(Member(pos, blob[pos : pos + 10], data))
        pos = len(blob) - len(d.unused_data)
    return out


def toc_of(blob: bytes) -> tuple[bytes, int]:
    """(raw TOC JSON, offset of the TOC member) read by hand from the footer."""
    footer = blob[-51:]
    toc_off = int(footer[16:32], 16)
    member = zlib.decompressobj(31).decompress(blob[toc_off:])
    hdr = tarfile.TarInfo.frombuf(member[:512], "utf-8", "surrogateescape")
    assert hdr.name == "stargz.index.json"
    return member[512 : 512 + hdr.size], toc_off


def structure(blob: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Everything but the compressed encoding: (gzip header, uncompressed bytes) of each
    member before the TOC, and the TOC JSON with offsets replaced by member indexes."""
    members = split_members(blob)
    raw, toc_off = toc_of(blob)
    index = {m.offset: i for i, m in enumerate(members)}
    body = [(m.header, m.data) for m in members if m.offset < toc_off]
    norm = re.sub(rb'"offset": (\d+)', lambda m: b'"offset": #%d' % index[int(m[1])], raw)
    return body, norm


def convert(ref: dict[str, Any], data: bytes | None = None) -> EstargzResult:
    return write_estargz(
        data if data is not None else (DATA / ref["input"]).read_bytes(),
        chunk_size=ref["chunk_size"],
        prioritized=ref["prioritized"],
        compression_level=ref["compression_level"],
        sub_blobs=ref["gomaxprocs"],
    )


@dataclass
class Node:
    kind: EntryKind
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: tuple[int, int]
    xattrs: dict[str, bytes]
    link: str | None
    content: bytes | None
    node: int


def read_layer(blob: bytes, annotations: dict[str, str]) -> tuple[LayerIndex, dict[str, Node]]:
    """Read every file of a layer through detect / parse_toc / decode_chunk, exactly the
    path the engine takes (and the one the ctr-remote fixtures are read with)."""
    loc = formats.detect(blob[-formats.TAIL_SIZE :], len(blob), annotations)
    index = formats.parse_toc(
        loc, blob[loc.offset : loc.offset + loc.length], len(blob), annotations
    )
    tree: dict[str, Node] = {}

    def walk(node: int, prefix: str) -> None:
        for name, child in index.readdir(node):
            path = prefix + name
            a = index.attr(child)
            content = None
            if a.kind == EntryKind.REG:
                parts = []
                for c in index.chunks(child):
                    parts.append(
                        formats.decode_chunk(
                            index.format, c, blob[c.blob_offset : c.fetch_end], path=path
                        )
                    )
                content = b"".join(parts)
                assert len(content) == a.size
            tree[path] = Node(
                kind=a.kind,
                mode=a.mode,
                uid=a.uid,
                gid=a.gid,
                size=a.size,
                mtime_ns=a.mtime_ns,
                nlink=a.nlink,
                rdev=(a.rdev_major, a.rdev_minor),
                xattrs=dict(index.xattrs(child)),
                link=index.readlink(child) if a.kind == EntryKind.SYMLINK else None,
                content=content,
                node=child,
            )
            if a.kind == EntryKind.DIR:
                walk(child, path + "/")

    walk(LayerIndex.ROOT, "")
    return index, tree


# --------------------------------------------------------------------------------------
# byte / structure equality with the Go builder


@pytest.mark.parametrize("ref", REFS, ids=[r["blob"] for r in REFS])
def test_matches_go_builder(ref: dict[str, Any]) -> None:
    expected = (DATA / ref["blob"]).read_bytes()
    result = convert(ref)
    if ref["compression_level"] == 0:
        # Stored deflate blocks are framed exactly like Go's: the whole blob must match.
        assert result.blob == expected
        assert result.toc_digest == ref["toc_digest"]
        assert result.diff_id == ref["diff_id"]
    else:
        assert structure(result.blob) == structure(expected)
        assert result.blob[-51:-35] == expected[-51:-35]  # footer header and Extra framing
    assert result.blob[-35:-19] == b"%016x" % result.toc_offset
    assert result.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(result.blob)).hexdigest()
    assert result.uncompressed_size == len(gzip.decompress(result.blob))
    raw, _ = toc_of(result.blob)
    assert result.toc_digest == "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("compress", ["gzip", "zstd", "stream"])
def test_compressed_and_streamed_input_give_the_same_blob(compress: str) -> None:
    ref = next(r for r in REFS if r["blob"] == "ref-pax-l0-p2.esgz")
    tar = (DATA / ref["input"]).read_bytes()
    src: Any
    if compress == "gzip":
        src = gzip.compress(tar)
    elif compress == "zstd":
        # Two frames: the Go builder's zstd reader reads across frames too.
        c = zstandard.ZstdCompressor()
        src = c.compress(tar[:10240]) + c.compress(tar[10240:])
    else:
        src = io.BytesIO(tar)
    assert convert(ref, src).blob == (DATA / ref["blob"]).read_bytes()


def test_gunzip_is_the_layer_tar_plus_toc() -> None:
    tar_in = (DATA / "input-pax.tar").read_bytes()
    result = write_estargz(tar_in, chunk_size=4096, prioritized=["big.bin"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(result.blob))) as out_tf:
        order = out_tf.getnames()
        out = {m.name: m for m in out_tf.getmembers()}
        out_data = {n: out_tf.extractfile(m).read() for n, m in out.items() if m.isreg()}  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(tar_in)) as in_tf:
        members = in_tf.getmembers()
        # The builder keeps the last of duplicate names and drops landmarks and old TOCs.
        expected = {m.name: m for m in members}
        in_data = {n: in_tf.extractfile(m).read() for n, m in expected.items() if m.isreg()}  # type: ignore[union-attr]
    del expected[PREFETCH_LANDMARK], expected["stargz.index.json"]
    assert set(out) == set(expected) | {PREFETCH_LANDMARK, "stargz.index.json"}
    for name, m in expected.items():
        o = out[name]
        assert (o.type, o.mode, o.uid, o.gid, o.linkname) == (
            m.type, m.mode, m.uid, m.gid, m.linkname,
        ), name  # fmt: skip
        assert (o.uname, o.gname, o.devmajor, o.devminor) == (
            m.uname, m.gname, m.devmajor, m.devminor,
        ), name  # fmt: skip
        assert o.mtime == m.mtime, name
        assert {k: v for k, v in o.pax_headers.items() if k.startswith("SCHILY.xattr.")} == {
            k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")
        }, name
        if m.isreg():
            assert out_data[name] == in_data[name], name
    assert in_data["dup.txt"] == b"second\n"
    assert out_data[PREFETCH_LANDMARK] == b"\x0f"
    toc = json.loads(out_data["stargz.index.json"])
    assert order[-1] == "stargz.index.json"
    names = [e["name"] for e in toc["entries"] if e["type"] != "chunk"]
    assert names[:3] == ["./", "big.bin", PREFETCH_LANDMARK]  # the root entry moves too


def test_landmarks() -> None:
    tar = (DATA / "input-gnu.tar").read_bytes()
    no_prio = json.loads(toc_of(write_estargz(tar).blob)[0])["entries"]
    assert no_prio[0]["name"] == NO_PREFETCH_LANDMARK
    assert all(e["name"] != PREFETCH_LANDMARK for e in no_prio)
    prio = json.loads(toc_of(write_estargz(tar, prioritized=["/etc/suid"]).blob)[0])["entries"]
    # Parents first (the root "./" and "./etc/"), then the file, then the landmark.
    assert [e["name"] for e in prio[:4]] == ["./", "./etc/", "etc/suid", PREFETCH_LANDMARK]
    lm = prio[3]
    assert lm["size"] == 1 and "mode" not in lm and "modtime" not in lm


def test_missing_prioritized_file() -> None:
    tar = (DATA / "input-gnu.tar").read_bytes()
    with pytest.raises(FormatError, match="nope"):
        write_estargz(tar, prioritized=["nope"])
    entries = json.loads(
        toc_of(write_estargz(tar, prioritized=["nope"], allow_missing_prioritized=True).blob)[0]
    )["entries"]
    assert entries[0]["name"] == PREFETCH_LANDMARK


@pytest.mark.parametrize(
    "bad",
    [
        b"x" * 700,  # not a tar header
        (DATA / "input-gnu.tar").read_bytes()[:2565],  # truncated inside a file's data
        gzip.compress(b"y" * 600)[:-9],  # truncated gzip
    ],
    ids=["garbage", "truncated-tar", "truncated-gzip"],
)
def test_bad_input_raises_format_error(bad: bytes) -> None:
    with pytest.raises(FormatError):
        write_estargz(bad)


def test_annotations_and_descriptor() -> None:
    result = write_estargz((DATA / "input-pax.tar").read_bytes())
    ann = layer_annotations(result)
    assert ann == {
        TOC_DIGEST_ANNOTATION: result.toc_digest,
        UNCOMPRESSED_SIZE_ANNOTATION: str(len(gzip.decompress(result.blob))),
    }
    desc = layer_descriptor(result)
    assert desc["digest"] == "sha256:" + hashlib.sha256(result.blob).hexdigest()
    assert desc["size"] == len(result.blob)
    assert formats.uncompressed_size_from_annotations(ann) == result.uncompressed_size


# --------------------------------------------------------------------------------------
# the reader reads what the writer writes, file for file


def test_reference_input_reads_back_through_the_reader() -> None:
    tar = (DATA / "input-pax.tar").read_bytes()
    result = write_estargz(tar, chunk_size=4096, prioritized=["etc/hello.txt"])
    index, tree = read_layer(result.blob, layer_annotations(result))
    assert index.format == LayerFormat.ESTARGZ and index.verified
    assert index.toc_digest == result.toc_digest
    assert index.prefetch == "landmark" and index.prefetch_end > 0
    assert tree["etc/hello.txt"].content == b"hello world\n"
    assert tree["etc/suid"].mode == 0o4755
    assert tree["hard"].node == tree["etc/hello.txt"].node
    assert tree["etc/hello.txt"].nlink == 2
    assert tree["link"].link == "etc/hello.txt"
    assert tree["dev/null"].kind == EntryKind.CHAR and tree["dev/null"].rdev == (1, 3)
    assert tree["etc/gone"].kind == EntryKind.WHITEOUT
    assert tree["opq"].xattrs.get("trusted.overlay.opaque") == b"y"
    assert tree["xattr.txt"].xattrs == {
        "user.foo": b"bar",
        "trusted.overlay.opaque": b"y",
        "security.capability": b"\x01\x02",
    }
    assert tree["big.bin"].size == 10000 and len(index.chunks(tree["big.bin"].node)) == 3
    assert tree["dup.txt"].content == b"second\n"
    assert PREFETCH_LANDMARK not in tree and "stargz.index.json" not in tree


@dataclass
class Spec:
    """One generated tar entry and what the reader must report for it."""

    path: str
    kind: str  # dir, reg, symlink, hardlink, whiteout, opaque, fifo
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    link: str = ""
    xattrs: dict[str, bytes] | None = None


_names = st.text(alphabet="abcxyz_-.é0", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.")
)
_modes = st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2755, 0o1777, 0o000, 0o444])
_xattrs = st.dictionaries(
    st.sampled_from(["user.a", "user.b", "security.capability", "trusted.x"]),
    st.binary(max_size=12).filter(lambda b: b"\0" not in b and b != b""),
    max_size=2,
)


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[Spec], int]:
    chunk = draw(st.sampled_from([16, 64, 100, 512]))
    sizes = st.one_of(
        st.integers(0, 3 * chunk + 1),
        st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 5 * chunk + 3]),
    )
    specs: list[Spec] = []
    dirs = [""]
    used: set[str] = set()
    regs: list[str] = []
    for _ in range(draw(st.integers(1, 14))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_names)
        path = f"{parent}/{name}" if parent else name
        if path in used:
            continue
        used.add(path)
        kind = draw(st.sampled_from(["dir", "reg", "reg", "reg", "symlink", "hardlink",
                                     "whiteout", "opaque", "fifo"]))  # fmt: skip
        common = {
            "mode": draw(_modes),
            "uid": draw(st.integers(0, 70000)),
            "gid": draw(st.integers(0, 70000)),
            "mtime": draw(st.integers(1, 4_000_000_000)),
        }
        if kind == "dir":
            specs.append(Spec(path, "dir", xattrs=draw(_xattrs), **common))  # type: ignore[arg-type]
            dirs.append(path)
        elif kind == "reg":
            data = draw(st.randoms(use_true_random=False)).randbytes(draw(sizes))
            specs.append(Spec(path, "reg", data=data, xattrs=draw(_xattrs), **common))  # type: ignore[arg-type]
            regs.append(path)
        elif kind == "symlink":
            specs.append(Spec(path, "symlink", link=draw(_names), **common))  # type: ignore[arg-type]
        elif kind == "hardlink" and regs:
            specs.append(Spec(path, "hardlink", link=draw(st.sampled_from(regs))))
        elif kind == "whiteout":
            specs.append(Spec(f"{parent}/.wh.{name}" if parent else f".wh.{name}", "whiteout"))
        elif kind == "opaque" and parent:
            if f"{parent}/.wh..wh..opq" not in used:
                used.add(f"{parent}/.wh..wh..opq")
                specs.append(Spec(f"{parent}/.wh..wh..opq", "opaque"))
        elif kind == "fifo":
            specs.append(Spec(path, "fifo", **common))  # type: ignore[arg-type]
    return specs, chunk


def make_tar(specs: list[Spec]) -> bytes:
    buf = io.BytesIO()
    types = {
        "dir": tarfile.DIRTYPE,
        "reg": tarfile.REGTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "whiteout": tarfile.REGTYPE,
        "opaque": tarfile.REGTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for s in specs:
            ti = tarfile.TarInfo(s.path + ("/" if s.kind == "dir" else ""))
            ti.type = types[s.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = s.mode, s.uid, s.gid, s.mtime
            ti.linkname = s.link
            ti.size = len(s.data)
            ti.uname = f"user{s.uid}" if s.uid else ""
            if s.xattrs:
                ti.pax_headers = {
                    "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                    for k, v in s.xattrs.items()
                }
            tf.addfile(ti, io.BytesIO(s.data) if s.kind == "reg" else None)
    return buf.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree=trees(),
    level=st.sampled_from([0, 1, 9]),
    sub_blobs=st.integers(1, 4),
    data=st.data(),
)
def test_roundtrip_generated_trees(
    tree: tuple[list[Spec], int], level: int, sub_blobs: int, data: st.DataObject
) -> None:
    specs, chunk = tree
    regs = [s.path for s in specs if s.kind == "reg"]
    prio = data.draw(
        st.lists(st.sampled_from(regs), max_size=3, unique=True) if regs else st.just([])
    )
    tar = make_tar(specs)
    result = write_estargz(
        tar, chunk_size=chunk, prioritized=prio, compression_level=level, sub_blobs=sub_blobs
    )

    # Runtimes that know nothing of eStargz: gunzip gives the same tar entries + the TOC.
    plain = gzip.decompress(result.blob)
    assert result.uncompressed_size == len(plain)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        got = {m.name.rstrip("/"): m for m in tf.getmembers()}
        for s in specs:
            m = got[s.path]
            if s.kind == "reg":
                assert tf.extractfile(m).read() == s.data  # type: ignore[union-attr]
    landmark = PREFETCH_LANDMARK if prio else NO_PREFETCH_LANDMARK
    assert set(got) == {s.path for s in specs} | {landmark, "stargz.index.json"}

    index, nodes = read_layer(result.blob, layer_annotations(result))
    assert index.verified and index.toc_digest == result.toc_digest
    if prio:
        assert index.prefetch == "landmark"
        # Every prioritised payload lies before the landmark.
        for p in prio:
            for c in index.chunks(nodes[p].node):
                assert c.blob_offset < index.prefetch_end
    else:
        assert index.prefetch == "none"
    links: dict[str, int] = {}
    paths = {s.path for s in specs}
    for s in specs:
        if s.kind in ("whiteout", "opaque"):
            parent, _, base = s.path.rpartition("/")
            if s.kind == "whiteout":
                n = nodes[(parent + "/" if parent else "") + base[len(".wh.") :]]
                assert n.kind == EntryKind.WHITEOUT
            else:
                assert nodes[parent].xattrs.get("trusted.overlay.opaque") == b"y"
            continue
        n = nodes[s.path]
        if s.kind == "hardlink":
            assert n.node == nodes[s.link].node
            links[s.link] = links.get(s.link, 1) + 1
            continue
        kind = {"dir": EntryKind.DIR, "reg": EntryKind.REG, "symlink": EntryKind.SYMLINK,
                "fifo": EntryKind.FIFO}[s.kind]  # fmt: skip
        assert n.kind == kind
        assert (n.mode, n.uid, n.gid) == (stat.S_IMODE(s.mode), s.uid, s.gid)
        assert n.mtime_ns == s.mtime * 10**9
        xattrs = dict(n.xattrs)
        if s.kind == "dir" and f"{s.path}/.wh..wh..opq" in paths:
            # The reader presents an opaque marker as these xattrs on its directory.
            assert xattrs.pop("trusted.overlay.opaque") == b"y"
            assert xattrs.pop("user.overlay.opaque") == b"y"
        assert xattrs == (s.xattrs or {})
        if s.kind == "reg":
            assert n.content == s.data
            chunks = index.chunks(n.node)
            assert len(chunks) == -(-len(s.data) // chunk)
            assert all(c.size <= chunk for c in chunks)
        if s.kind == "symlink":
            assert n.link == s.link
    for target, count in links.items():
        assert nodes[target].nlink == count


# --------------------------------------------------------------------------------------
# ctr-remote fixtures: alsd re-converting them gives the same layout, read the same way


@pytest.mark.parametrize("tag", ["esgz", "esgz-noopt"])
def test_reconverting_ctr_remote_layers(fixtures: Path, tag: str) -> None:
    layout = OciLayout(fixtures / "images")
    for layer in layout.image(tag).layers:
        blob = layout.blob(layer.digest)
        _, toc_off = toc_of(blob)
        # The layer tar as ctr-remote got it: everything before the TOC entry.
        tar = gzip.decompress(blob[:toc_off]) + bytes(1024)
        if tag == "esgz":
            # The fixture README lists these as the recorded prioritized files; ctr-remote
            # builds on this 2-part layout (GOMAXPROCS 2) and ignores names a layer lacks.
            result = write_estargz(
                tar,
                chunk_size=65536,
                prioritized=["data/small.txt", "bin/busybox", "data/dir/deep/file.txt"],
                allow_missing_prioritized=True,
                sub_blobs=2,
            )
        else:
            result = write_estargz(tar, sub_blobs=2)
        assert structure(result.blob) == structure(blob), layer.digest
        assert result.uncompressed_size == int(layer.annotations[UNCOMPRESSED_SIZE_ANNOTATION])

        # The same reader, the same calls, for both blobs: identical trees.
        ref_index, ref_tree = read_layer(blob, layer.annotations)
        own_index, own_tree = read_layer(result.blob, layer_annotations(result))
        assert ref_index.verified and own_index.verified
        assert ref_index.prefetch == own_index.prefetch
        strip = [{k: v for k, v in vars(n).items() if k != "node"} for n in ref_tree.values()]
        mine = [{k: v for k, v in vars(n).items() if k != "node"} for n in own_tree.values()]
        assert list(own_tree) == list(ref_tree)
        assert mine == strip


def _tar_with(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = sorted(
            {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
        )
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
        for name in names:
            data = name.encode() * 3
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_convert_prioritises_the_files_the_runtime_reads_first() -> None:
    from alsd.tools.convert import RUNTIME_FILES, with_runtime_files

    # The order alsd convert asks for: runtime files, then the user's list (normalised,
    # without duplicates); nothing asked for stays nothing (no landmark, no prefetch).
    assert with_runtime_files([]) == ()
    assert with_runtime_files(["/usr/bin/app", "etc/passwd", "usr/bin/app"]) == (
        *RUNTIME_FILES,
        "usr/bin/app",
    )
    tar = _tar_with(["usr/bin/app", "etc/group", "etc/passwd", "etc/other"])
    blob = write_estargz(
        tar, prioritized=with_runtime_files(["usr/bin/app"]), allow_missing_prioritized=True
    ).blob
    names = [e["name"] for e in json.loads(toc_of(blob)[0])["entries"] if e["type"] == "reg"]
    assert names[:3] == ["etc/passwd", "etc/group", "usr/bin/app"]
    index, _ = read_layer(blob, {})
    assert index.prefetch == "landmark"
    for path in ("etc/passwd", "etc/group", "usr/bin/app"):
        node = index.find(path)
        assert node is not None
        assert all(c.fetch_end <= index.prefetch_end for c in index.chunks(node))
    other = index.find("etc/other")
    assert other is not None
    assert all(c.blob_offset >= index.prefetch_end for c in index.chunks(other))
    # A layer without them (the usual upper layer) converts all the same.
    plain = write_estargz(
        _tar_with(["usr/bin/app"]),
        prioritized=with_runtime_files(["usr/bin/app"]),
        allow_missing_prioritized=True,
    ).blob
    assert read_layer(plain, {})[0].prefetch == "landmark"
