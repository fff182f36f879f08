"""Every fixture layer made by other tools: detected, TOC verified, files reassembled.

The reassembled content of every regular file must equal the same file in the plain gzip
tag's layer, read with the standard library's tarfile (an independent reader).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from alsd.errors import PlainLayer
from alsd.oci import formats
from alsd.oci.layer_index import EntryKind, LayerFormat, LayerIndex, normalize_name
from tests.support.oci_layout import OciLayout

LAZY_TAGS = {
    "esgz": (LayerFormat.ESTARGZ, formats.ANN_STARGZ_TOC_DIGEST),
    "esgz-noopt": (LayerFormat.ESTARGZ, formats.ANN_STARGZ_TOC_DIGEST),
    "zstdchunked-podman43": (LayerFormat.ZSTD_CHUNKED, formats.ANN_CSTORAGE_OLD_CHECKSUM),
    "zstdchunked-podman54": (LayerFormat.ZSTD_CHUNKED, formats.ANN_CSTORAGE_CHECKSUM),
    "zstdchunked-stargz": (LayerFormat.ZSTD_CHUNKED, formats.ANN_STARGZ_TOC_DIGEST),
}


@pytest.fixture(scope="module")
def layout(fixtures: Path) -> OciLayout:
    return OciLayout(fixtures / "images")


def tar_files(data: bytes) -> tuple[dict[str, bytes], dict[str, tarfile.TarInfo]]:
    """Regular-file contents (hardlinks resolved by tarfile) and all members by name."""
    contents: dict[str, bytes] = {}
    members: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for m in tf.getmembers():
            name = normalize_name(m.name)
            members[name] = m
            if m.isreg() or m.islnk():
                f = tf.extractfile(m)
                assert f is not None
                contents[name] = f.read()
    return contents, members


def walk(index: LayerIndex, node: int = 0, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for name, child in index.readdir(node):
        path = f"{prefix}{name}"
        out[path] = child
        if index.attr(child).kind == EntryKind.DIR:
            out.update(walk(index, child, path + "/"))
    return out


def read_file(index: LayerIndex, node: int, blob: bytes, path: str) -> bytes:
    return b"".join(
        formats.decode_chunk(index.format, c, blob[c.blob_offset : c.fetch_end], path=path)
        for c in index.chunks(node)
    )


def check_against_tar(index: LayerIndex, blob: bytes, tar_bytes: bytes) -> None:
    contents, members = tar_files(tar_bytes)
    tree = walk(index)
    regular = {p for p, n in tree.items() if index.attr(n).kind == EntryKind.REG}
    expected_regular = {
        p
        for p in contents
        if not p.rpartition("/")[2].startswith(".wh.")
        and p not in (".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json")
    }
    assert regular == expected_regular
    for path in sorted(regular):
        node = tree[path]
        data = read_file(index, node, blob, path)
        assert data == contents[path], path
        assert index.attr(node).size == len(data)
    for path, m in members.items():
        parent, _, base = path.rpartition("/")
        if base == ".wh..wh..opq":
            d = index.find(parent)
            assert d is not None
            assert index.xattrs(d)["trusted.overlay.opaque"] == b"y"
        elif base.startswith(".wh."):
            wh = index.find(f"{parent}/{base[4:]}".lstrip("/"))
            assert wh is not None and index.attr(wh).kind == EntryKind.WHITEOUT
        elif m.issym():
            node = tree[path]
            assert index.attr(node).kind == EntryKind.SYMLINK
            assert index.readlink(node) == m.linkname
        elif m.isdir() and path:
            assert index.attr(tree[path]).kind == EntryKind.DIR


def test_layout_has_the_expected_tags(layout: OciLayout) -> None:
    assert set(layout.tags()) == {"gzip", *LAZY_TAGS}


@pytest.mark.parametrize("tag", sorted(LAZY_TAGS))
def test_fixture_layers_detected_verified_and_identical_to_gzip(
    layout: OciLayout, tag: str
) -> None:
    want_format, digest_key = LAZY_TAGS[tag]
    gzip_layers = layout.image("gzip").layers
    layers = layout.image(tag).layers
    assert len(layers) == len(gzip_layers)
    for layer, plain in zip(layers, gzip_layers, strict=True):
        blob = layout.blob(layer.digest)
        index = formats.index_blob(blob, layer.annotations, layer.media_type)
        assert index.format == want_format
        assert index.verified
        assert index.toc_digest == layer.annotations[digest_key]
        assert index.blob_size == len(blob)
        check_against_tar(index, blob, layout.blob(plain.digest))
        # The blob is also a valid tar stream in its own right.
        check_against_tar(index, blob, _decompress(blob))
        # Reloading from the persisted state gives the same answers.
        again = LayerIndex.from_state(index.to_state())
        check_against_tar(again, blob, layout.blob(plain.digest))


def test_fixture_file_attributes(layout: OciLayout) -> None:
    for tag in LAZY_TAGS:
        layer = layout.image(tag).layers[0]
        index = formats.index_blob(layout.blob(layer.digest), layer.annotations)
        small = index.find("data/small.txt")
        hard = index.find("./data/hard")
        assert small is not None and small == hard, tag
        assert index.attr(small).nlink == 2
        assert index.xattrs(small) == {"user.fixture": b"value"}
        suid = index.find("data/suid.sh")
        assert suid is not None and index.attr(suid).mode == 0o4755
        empty = index.find("data/empty")
        assert empty is not None and index.attr(empty).size == 0
        assert index.chunks(empty) == []
        assert index.path(index.find("data/dir/deep/file.txt") or 0) == "data/dir/deep/file.txt"
        assert index.lookup(0, ".prefetch.landmark") is None
        assert index.lookup(0, ".no.prefetch.landmark") is None


def test_prefetch_landmarks(layout: OciLayout) -> None:
    esgz = layout.image("esgz").layers[0]
    index = formats.index_blob(layout.blob(esgz.digest), esgz.annotations)
    assert index.prefetch == "landmark"
    # The prioritized files lie before the landmark, the rest after it.
    for path in ("data/small.txt", "bin/busybox", "data/dir/deep/file.txt"):
        node = index.find(path)
        assert node is not None
        assert all(c.fetch_end <= index.prefetch_end for c in index.chunks(node))
    big = index.find("data/big.bin")
    assert big is not None
    assert all(c.blob_offset >= index.prefetch_end for c in index.chunks(big))
    noopt = layout.image("esgz-noopt").layers[0]
    index = formats.index_blob(layout.blob(noopt.digest), noopt.annotations)
    assert (index.prefetch, index.prefetch_end) == ("none", 0)
    podman = layout.image("zstdchunked-podman54").layers[0]
    index = formats.index_blob(layout.blob(podman.digest), podman.annotations)
    assert (index.prefetch, index.prefetch_end) == (None, 0)


def test_uncompressed_sizes(layout: OciLayout) -> None:
    for tag in ("esgz", "zstdchunked-stargz"):
        for layer in layout.image(tag).layers:
            size = formats.uncompressed_size_from_annotations(layer.annotations)
            assert size == len(_decompress(layout.blob(layer.digest)))
    for layer in layout.image("zstdchunked-podman54").layers:
        blob = layout.blob(layer.digest)
        loc = formats.detect(blob[-formats.TAIL_SIZE :], len(blob), layer.annotations)
        assert loc.tarsplit is not None
        off, length = loc.tarsplit
        size = formats.tarsplit_uncompressed_size(blob[off : off + length])
        assert size == len(_decompress(blob))
    assert formats.uncompressed_size_from_annotations({}) is None


def test_footer_alone_finds_the_toc(layout: OciLayout) -> None:
    """Without annotations every format is found from its footer (not verified then)."""
    for tag, (want_format, _) in LAZY_TAGS.items():
        layer = layout.image(tag).layers[0]
        blob = layout.blob(layer.digest)
        index = formats.index_blob(blob, {})
        assert index.format == want_format
        assert not index.verified
    podman54 = layout.image("zstdchunked-podman54").layers[0]
    blob = layout.blob(podman54.digest)
    loc = formats.detect(blob[-formats.TAIL_SIZE :], len(blob), {})
    assert loc.producer == formats.ZstdProducer.CSTORAGE
    assert loc.tarsplit is not None
    # c/storage's TOC digest covers the compressed manifest.
    assert (
        formats.index_blob(blob, {}).toc_digest
        == podman54.annotations[formats.ANN_CSTORAGE_CHECKSUM]
    )


def test_plain_gzip_layers_are_not_lazy(layout: OciLayout) -> None:
    for layer in layout.image("gzip").layers:
        blob = layout.blob(layer.digest)
        with pytest.raises(PlainLayer):  # a NotLazyError: podman pulls it
            formats.detect(blob[-formats.TAIL_SIZE :], len(blob), {}, layer.media_type)


def test_samples(fixtures: Path) -> None:
    gz = (fixtures / "samples" / "estargz-sample.gz").read_bytes()
    index = formats.index_blob(gz, {})
    assert index.format == LayerFormat.ESTARGZ
    # Independent TOC digest: hash the stargz.index.json entry of the tar stream.
    with tarfile.open(fileobj=io.BytesIO(gz), mode="r:gz") as tf:
        f = tf.extractfile("stargz.index.json")
        assert f is not None
        toc_json = f.read()
    digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    assert index.toc_digest == digest
    assert formats.index_blob(gz, {formats.ANN_STARGZ_TOC_DIGEST: digest}).verified
    check_against_tar(index, gz, _decompress(gz))
    _check_sample_tree(index)
    big = index.find("big.bin")
    assert big is not None
    assert [(c.blob_offset, c.fetch_end) for c in index.chunks(big)] == [
        (368, 617),
        (617, 866),
        (866, 1115),
        (1115, 1283),
    ]
    assert index.prefetch_end == 208

    zst = (fixtures / "samples" / "zstdchunked-stargz-sample.zst").read_bytes()
    index = formats.index_blob(zst, {})
    assert index.format == LayerFormat.ZSTD_CHUNKED
    assert index.toc_digest.startswith("sha256:233b70")  # spec 4.2, uncompressed TOC
    ann = {
        formats.ANN_STARGZ_TOC_DIGEST: index.toc_digest,
        formats.ANN_CSTORAGE_OLD_POSITION: "680:583:2026:1",
        formats.ANN_CSTORAGE_OLD_CHECKSUM: "sha256:"
        + hashlib.sha256(zst[680 : 680 + 583]).hexdigest(),
    }
    assert ann[formats.ANN_CSTORAGE_OLD_CHECKSUM].startswith("sha256:182802")
    verified = formats.index_blob(zst, ann)
    assert verified.verified and verified.toc_digest == index.toc_digest
    check_against_tar(index, zst, _decompress(zst))
    _check_sample_tree(index)


def _check_sample_tree(index: LayerIndex) -> None:
    names = [n for n, _ in index.readdir(0)]
    assert names == ["big.bin", "etc", "link", "opq"]
    gone = index.find("etc/gone")
    assert gone is not None and index.attr(gone).kind == EntryKind.WHITEOUT
    opq = index.find("opq")
    assert opq is not None
    assert index.xattrs(opq) == {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"}
    assert index.readdir(opq) == []
    link = index.find("link")
    assert link is not None and index.readlink(link) == "etc/hello.txt"
    assert index.attr(link).size == len("etc/hello.txt")
    big = index.find("big.bin")
    assert big is not None and len(index.chunks(big)) == 4
    assert index.prefetch == "landmark"


def _decompress(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        import gzip

        return gzip.decompress(blob)
    out = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    assert isinstance(out, bytes)
    return out
