"""Bad input: every case gets its own corrupt blob and must raise FormatError/IntegrityError.

The blobs are built by a minimal eStargz writer below (gzip members + TOC member + 51-byte
footer, spec.md 3.1-3.3); the reader never looks at the stand-in tar headers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alsd.errors import FormatError, IntegrityError, NotLazyError
from alsd.oci import formats
from alsd.oci.layer_index import LayerFormat
from tests.support.oci_layout import OciLayout

Entries = list[dict[str, Any]]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def member(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def footer(toc_offset: int) -> bytes:
    extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    head = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
    return head + b"\x01\x00\x00\xff\xff" + bytes(8)


def toc_member(entries: Entries) -> tuple[bytes, bytes]:
    toc = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(toc)
    pad = -len(toc) % 512
    return member(info.tobuf(tarfile.USTAR_FORMAT) + toc + bytes(pad) + bytes(1024)), toc


class Blob:
    """A valid little eStargz blob under construction: payload members, then the TOC."""

    def __init__(self) -> None:
        self.data = bytearray(member(b"h" * 512))
        self.entries: Entries = [{"name": "./", "type": "dir", "mode": 0o755}]

    def file(self, name: str, content: bytes, chunk: int = 0) -> None:
        pieces = (
            [content[i : i + chunk] for i in range(0, len(content), chunk)] if chunk else [content]
        )
        file_off = 0
        for i, piece in enumerate(pieces):
            off = len(self.data)
            self.data += member(piece)
            e: dict[str, Any] = {
                "name": name,
                "type": "reg" if i == 0 else "chunk",
                "offset": off,
                "chunkOffset": file_off,
                "chunkDigest": sha(piece),
            }
            if len(pieces) > 1:
                e["chunkSize"] = len(piece)
            if i == 0:
                e.update(size=len(content), digest=sha(content), mode=0o644)
            self.entries.append(e)
            file_off += len(piece)
            self.data += member(b"h" * 512)  # next tar header

    def finish(self) -> tuple[bytes, str]:
        toc_off = len(self.data)
        tm, toc = toc_member(self.entries)
        return bytes(self.data) + tm + footer(toc_off), sha(toc)


def base() -> Blob:
    b = Blob()
    b.file("data/a.txt", b"hello\n")
    b.file("./data/big", bytes(range(256)) * 4, chunk=300)
    return b


def parse(blob: bytes, annotations: dict[str, str] | None = None, **kw: Any) -> Any:
    return formats.index_blob(blob, annotations or {}, **kw)


def test_the_synthetic_blob_is_valid() -> None:
    blob, digest = base().finish()
    index = parse(blob, {formats.ANN_STARGZ_TOC_DIGEST: digest})
    assert index.verified and index.format == LayerFormat.ESTARGZ
    big = index.find("data/big")
    assert big is not None
    data = b"".join(
        formats.decode_chunk(index.format, c, blob[c.blob_offset : c.fetch_end])
        for c in index.chunks(big)
    )
    assert data == bytes(range(256)) * 4
    assert len(index.chunks(big)) == 4


def _entry(b: Blob, name: str) -> dict[str, Any]:
    return next(e for e in b.entries if e["name"].lstrip("./") == name and e["type"] == "reg")


def _mut_escape(b: Blob) -> None:
    b.entries.append({"name": "../../etc/passwd", "type": "reg", "mode": 0o644})


def _mut_absolute(b: Blob) -> None:
    b.entries.append({"name": "/etc/passwd", "type": "reg", "mode": 0o644})


def _mut_escape_hardlink(b: Blob) -> None:
    b.entries.append({"name": "x", "type": "hardlink", "linkName": "../../etc/shadow"})


def _mut_offset_outside(b: Blob) -> None:
    _entry(b, "data/a.txt")["offset"] = len(b.data) + 10


def _mut_negative_offset(b: Blob) -> None:
    _entry(b, "data/a.txt")["offset"] = -1


def _mut_negative_chunk(b: Blob) -> None:
    b.entries[-1]["chunkSize"] = -5


def _mut_overlapping_chunks(b: Blob) -> None:
    b.entries[-1]["chunkOffset"] -= 10


def _mut_gap(b: Blob) -> None:
    b.entries[-2]["chunkOffset"] += 10
    b.entries[-2]["chunkSize"] -= 10


def _mut_short(b: Blob) -> None:
    _entry(b, "data/a.txt")["size"] = 100
    _entry(b, "data/a.txt")["chunkSize"] = 6


def _mut_hardlink_missing(b: Blob) -> None:
    b.entries.append({"name": "data/h", "type": "hardlink", "linkName": "data/nope"})


def _mut_hardlink_to_dir(b: Blob) -> None:
    b.entries.append({"name": "data/h", "type": "hardlink", "linkName": "data"})


def _mut_hardlink_to_symlink(b: Blob) -> None:
    b.entries.append({"name": "s", "type": "symlink", "linkName": "data/a.txt"})
    b.entries.append({"name": "data/h", "type": "hardlink", "linkName": "s"})


def _mut_dup_reg_dir(b: Blob) -> None:
    b.entries.append({"name": "data/a.txt/", "type": "dir", "mode": 0o755})


def _mut_dup_reg_symlink(b: Blob) -> None:
    b.entries.append({"name": "./data/a.txt", "type": "symlink", "linkName": "x"})


def _mut_file_as_parent(b: Blob) -> None:
    b.entries.append({"name": "data/a.txt/child", "type": "reg", "mode": 0o644})


def _mut_unknown_type(b: Blob) -> None:
    b.entries.append({"name": "q", "type": "socket"})


def _mut_bad_digest(b: Blob) -> None:
    _entry(b, "data/a.txt")["chunkDigest"] = "md5:abc"


def _mut_orphan_chunk(b: Blob) -> None:
    b.entries.append({"name": "data/zzz", "type": "chunk", "offset": 50, "chunkDigest": sha(b"")})


def _mut_bad_xattr(b: Blob) -> None:
    _entry(b, "data/a.txt")["xattrs"] = {"user.x": "not base64!"}


def _mut_bad_mtime(b: Blob) -> None:
    _entry(b, "data/a.txt")["modtime"] = "yesterday"


def _mut_overlapping_members(b: Blob) -> None:
    # Two files claim the same bytes of one member.
    a = _entry(b, "data/a.txt")
    b.entries.append(
        {
            "name": "data/twin",
            "type": "reg",
            "size": 6,
            "offset": a["offset"],
            "innerOffset": 2,
            "chunkDigest": sha(b"llo\n\x00\x00"),
        }
    )


BAD_TOCS: dict[str, tuple[Callable[[Blob], None], str]] = {
    "escape-dotdot": (_mut_escape, "escapes the root"),
    "escape-absolute": (_mut_absolute, "absolute"),
    "escape-hardlink-target": (_mut_escape_hardlink, "escapes the root"),
    "offset-outside-blob": (_mut_offset_outside, "outside the blob"),
    "negative-offset": (_mut_negative_offset, "negative"),
    "negative-chunk": (_mut_negative_chunk, "negative"),
    "overlapping-chunks": (_mut_overlapping_chunks, "overlapping"),
    "chunk-gap": (_mut_gap, "do not cover"),
    "chunks-short-of-size": (_mut_short, "cover 6 bytes"),
    "hardlink-missing": (_mut_hardlink_missing, "missing"),
    "hardlink-to-dir": (_mut_hardlink_to_dir, "not a regular file"),
    "hardlink-to-symlink": (_mut_hardlink_to_symlink, "not a regular file"),
    "duplicate-reg-dir": (_mut_dup_reg_dir, "conflicting types"),
    "duplicate-reg-symlink": (_mut_dup_reg_symlink, "conflicting types"),
    "file-as-parent": (_mut_file_as_parent, "not a directory"),
    "unknown-type": (_mut_unknown_type, "unknown type"),
    "bad-digest": (_mut_bad_digest, "not a sha256 digest"),
    "orphan-chunk": (_mut_orphan_chunk, "does not belong to the preceding file"),
    "bad-xattr": (_mut_bad_xattr, "base64"),
    "bad-mtime": (_mut_bad_mtime, "modtime"),
    "overlapping-members": (_mut_overlapping_members, "overlaps"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOCS))
def test_bad_toc_raises_format_error_naming_the_entry(case: str) -> None:
    mutate, reason = BAD_TOCS[case]
    b = base()
    mutate(b)
    blob, _ = b.finish()
    with pytest.raises(FormatError, match=reason) as info:
        parse(blob)
    assert "entry" in str(info.value) or "'" in str(info.value)
    assert not isinstance(info.value, NotLazyError)


def test_unknown_footer() -> None:
    blob, _ = base().finish()
    with pytest.raises(FormatError, match="unknown footer"):
        parse(blob[:-1] + b"\x01")
    with pytest.raises(FormatError, match="unknown footer"):
        parse(bytes(range(256)) * 10)
    with pytest.raises(FormatError, match="unknown footer"):
        parse(b"")


def test_plain_layer_media_type_is_not_lazy() -> None:
    plain = gzip.compress(bytes(2048))
    with pytest.raises(NotLazyError):
        formats.detect(plain[-72:], len(plain), {}, "application/vnd.oci.image.layer.v1.tar+gzip")


def test_toc_offset_outside_blob() -> None:
    blob, _ = base().finish()
    bad = blob[:-51] + footer(len(blob) + 100)
    with pytest.raises(FormatError, match="outside the blob"):
        parse(bad)


def test_toc_digest_mismatch_is_an_integrity_error() -> None:
    _, digest = base().finish()
    other = base()
    other.file("extra", b"x")
    other_blob, other_digest = other.finish()
    assert other_digest != digest
    with pytest.raises(IntegrityError, match="TOC digest mismatch"):
        parse(other_blob, {formats.ANN_STARGZ_TOC_DIGEST: digest})


def test_truncated_toc() -> None:
    b = base()
    toc_off = len(b.data)
    tm, _ = toc_member(b.entries)
    blob = bytes(b.data) + tm[: len(tm) // 2] + footer(toc_off)
    with pytest.raises(FormatError, match=r"truncated|not valid gzip"):
        parse(blob)
    with pytest.raises(FormatError, match="truncated"):
        formats.parse_toc(
            formats.detect(blob[-72:], len(blob), {}), b"", len(blob), {}, max_toc_bytes=1 << 20
        )


def test_toc_member_holding_another_file() -> None:
    b = base()
    toc_off = len(b.data)
    info = tarfile.TarInfo("not-the-toc")
    info.size = 2
    blob = bytes(b.data) + member(info.tobuf() + b"{}" + bytes(510 + 1024)) + footer(toc_off)
    with pytest.raises(FormatError, match=r"not stargz\.index\.json"):
        parse(blob)


def test_oversized_toc() -> None:
    blob, _ = base().finish()
    parse(blob, max_toc_bytes=1 << 20)
    with pytest.raises(FormatError, match="exceeds the limit"):
        parse(blob, max_toc_bytes=100)


def test_toc_not_json() -> None:
    b = base()
    toc_off = len(b.data)
    info = tarfile.TarInfo("stargz.index.json")
    info.size = 5
    blob = bytes(b.data) + member(info.tobuf() + b"{nope" + bytes(507 + 1024)) + footer(toc_off)
    with pytest.raises(FormatError, match="not valid JSON"):
        parse(blob)


def test_corrupt_chunk_raises_integrity_error_naming_file_and_offset() -> None:
    blob, _ = base().finish()
    index = parse(blob)
    big = index.find("data/big")
    c = index.chunks(big)[2]
    good = blob[c.blob_offset : c.fetch_end]
    assert formats.decode_chunk(index.format, c, good, path="data/big")
    # A flipped byte inside the deflate data: either zlib or the digest notices.
    bad = bytearray(good)
    bad[15] ^= 0xFF
    with pytest.raises(IntegrityError, match=r"data/big at offset 600"):
        formats.decode_chunk(index.format, c, bytes(bad), path="data/big")
    # Well-formed gzip of the wrong bytes: the digest notices.
    wrong = member(b"\x00" * c.size)
    with pytest.raises(IntegrityError, match=r"data/big at offset 600: chunk digest"):
        formats.decode_chunk(index.format, c, wrong, path="data/big")
    # Too few bytes fetched.
    with pytest.raises(IntegrityError, match=r"data/big at offset 600"):
        formats.decode_chunk(index.format, c, good[:10], path="data/big")


def test_inner_offset_chunks_share_a_member() -> None:
    """min-chunk-size mode: two small files in one gzip member (spec 3.1)."""
    b = Blob()
    off = len(b.data)
    b.data += member(b"first" + b"second!")
    b.entries += [
        {"name": "f1", "type": "reg", "size": 5, "offset": off, "chunkDigest": sha(b"first")},
        {
            "name": "f2",
            "type": "reg",
            "size": 7,
            "offset": off,
            "innerOffset": 5,
            "chunkDigest": sha(b"second!"),
        },
    ]
    blob, _ = b.finish()
    index = parse(blob)
    for name, want in (("f1", b"first"), ("f2", b"second!")):
        (c,) = index.chunks(index.find(name))
        assert c.fetch_end == off + len(member(b"first" + b"second!"))
        assert formats.decode_chunk(index.format, c, blob[c.blob_offset : c.fetch_end]) == want


# -- zstd:chunked ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def podman54(fixtures: Path) -> tuple[bytes, dict[str, str]]:
    layout = OciLayout(fixtures / "images")
    layer = layout.image("zstdchunked-podman54").layers[0]
    return layout.blob(layer.digest), layer.annotations


def test_zstd_manifest_checksum_mismatch(podman54: tuple[bytes, dict[str, str]]) -> None:
    blob, ann = podman54
    bad = dict(ann)
    bad[formats.ANN_CSTORAGE_CHECKSUM] = sha(b"something else")
    with pytest.raises(IntegrityError, match="TOC digest mismatch"):
        parse(blob, bad)


def test_zstd_corrupt_manifest(podman54: tuple[bytes, dict[str, str]]) -> None:
    blob, ann = podman54
    off = int(ann[formats.ANN_CSTORAGE_POSITION].split(":")[0])
    corrupt = bytearray(blob)
    corrupt[off + 20 : off + 40] = bytes(20)
    unchecked = {k: v for k, v in ann.items() if k != formats.ANN_CSTORAGE_CHECKSUM}
    with pytest.raises(FormatError):
        parse(bytes(corrupt), unchecked)


def test_zstd_manifest_position_outside_blob(podman54: tuple[bytes, dict[str, str]]) -> None:
    blob, ann = podman54
    bad = dict(ann)
    bad[formats.ANN_CSTORAGE_POSITION] = f"{len(blob) - 10}:3304:14717:1"
    with pytest.raises(FormatError, match="outside the blob"):
        parse(blob, bad)
    bad[formats.ANN_CSTORAGE_POSITION] = "1:2"
    with pytest.raises(FormatError, match="expected 4 fields"):
        parse(blob, bad)


def test_zstd_oversized_and_truncated_manifest(podman54: tuple[bytes, dict[str, str]]) -> None:
    blob, ann = podman54
    with pytest.raises(FormatError, match="exceeds the limit"):
        parse(blob, ann, max_toc_bytes=10_000)
    # Claimed uncompressed length larger than what the manifest holds.
    off, clen, ulen, _ = ann[formats.ANN_CSTORAGE_POSITION].split(":")
    bad = dict(ann)
    bad[formats.ANN_CSTORAGE_POSITION] = f"{off}:{int(clen) - 100}:{ulen}:1"
    del bad[formats.ANN_CSTORAGE_CHECKSUM]
    with pytest.raises(FormatError):
        parse(blob, bad)


def test_zstd_footer_without_annotations_in_a_cut_blob(
    podman54: tuple[bytes, dict[str, str]],
) -> None:
    blob, _ = podman54
    with pytest.raises(FormatError):
        parse(blob[:-1])


def test_zstd_corrupt_chunk(podman54: tuple[bytes, dict[str, str]]) -> None:
    blob, ann = podman54
    index = parse(blob, ann)
    node = index.find("data/big.bin")
    c = index.chunks(node)[1]
    bad = bytearray(blob[c.blob_offset : c.fetch_end])
    bad[len(bad) // 2] ^= 0x55
    with pytest.raises(IntegrityError, match=f"data/big.bin at offset {c.file_offset}"):
        formats.decode_chunk(index.format, c, bytes(bad), path="data/big.bin")


def test_zstd_zeros_chunks(podman54: tuple[bytes, dict[str, str]]) -> None:
    blob, ann = podman54
    index = parse(blob, ann)
    node = index.find("bin/busybox")
    zeros = [c for c in index.chunks(node) if c.zeros]
    assert zeros
    for c in zeros:
        # Nothing needs fetching, and what the blob holds agrees.
        assert formats.decode_chunk(index.format, c, b"") == bytes(c.size)
        assert formats.decode_chunk(index.format, c, blob[c.blob_offset : c.fetch_end]) == bytes(
            c.size
        )
