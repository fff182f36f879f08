"""Pure eStargz writer: a layer tar (plain, gzip or zstd) in, an eStargz blob out.

The output is what stargz-snapshotter's ``estargz.Build`` (Go) writes for the same input,
options and parallelism, except for the deflate bytes inside each gzip member (Go's
``compress/flate`` and zlib encode differently, so compressed offsets, and with them the TOC
digest, differ). The member layout, every gzip header, the uncompressed bytes of every member
and the TOC JSON up to its offset values are the same, and so is the footer format; see
stargz-snapshotter's docs/estargz.md and ``tests/data/estargz/README.md``. At compression
level 0 the blob is byte-identical.

Every tar header is re-encoded with Go's ``archive/tar`` rules (twice: once when the sorted
entries are re-assembled, once in ``Writer.AppendTar``): :mod:`alsd.oci.gotar` is that
port, and why it is one.

Pure and synchronous: no file I/O besides reading the stream object it is given.
"""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from alsd.errors import FormatError
from alsd.oci import annotations as keys
from alsd.oci.gotar import (
    HEADER_ONLY,
    TYPE_BLOCKDEV,
    TYPE_CHAR,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_LINK,
    TYPE_REG,
    TYPE_SYMLINK,
    XATTR_PREFIX,
    GoTime,
    Header,
    TarError,
    clean_entry_name,
    go_path_split,
    next_entry,
    pad,
    round_second,
    unix_seconds,
    write_header,
)

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"
FOOTER_SIZE = 51
DEFAULT_CHUNK_SIZE = 4 << 20

TOC_DIGEST_ANNOTATION = keys.STARGZ_TOC_DIGEST
UNCOMPRESSED_SIZE_ANNOTATION = keys.UNCOMPRESSED_SIZE


@dataclass(frozen=True, slots=True)
class EstargzResult:
    """An eStargz blob and the values its layer descriptor / image config need."""

    blob: bytes
    toc_digest: str  # "sha256:<hex>" of the TOC JSON bytes
    uncompressed_size: int  # length of the gunzipped blob (the layer tar incl. TOC entry)
    diff_id: str  # "sha256:<hex>" of the gunzipped blob
    toc_offset: int  # blob offset of the gzip member holding the TOC

    @property
    def blob_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


def layer_annotations(result: EstargzResult) -> dict[str, str]:
    """The annotations ``ctr-remote``/``nerdctl`` put on an eStargz layer descriptor."""
    return {
        TOC_DIGEST_ANNOTATION: result.toc_digest,
        UNCOMPRESSED_SIZE_ANNOTATION: str(result.uncompressed_size),
    }


def layer_descriptor(
    result: EstargzResult,
    media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip",
) -> dict[str, object]:
    """An OCI descriptor for the blob, with the eStargz annotations."""
    return {
        "mediaType": media_type,
        "digest": result.blob_digest,
        "size": len(result.blob),
        "annotations": layer_annotations(result),
    }


def write_estargz(
    src: bytes | bytearray | memoryview | BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] = (),
    compression_level: int = 9,
    sub_blobs: int = 1,
    allow_missing_prioritized: bool = False,
) -> EstargzResult:
    """Convert a tar (plain, gzip or zstd; detected by magic) into an eStargz blob.

    ``prioritized`` lists files (paths relative to "/") that go first, with their parent
    directories, followed by ``.prefetch.landmark``; without it ``.no.prefetch.landmark``
    comes first. ``sub_blobs`` mirrors the Go builder's parallelism (it splits the entries
    into at least GOMAXPROCS parts, each starting a new gzip member and re-emitting owner
    names); 1 gives the layout of a single-threaded build. A prioritised path missing from
    the tar raises :class:`FormatError` unless ``allow_missing_prioritized``.
    """
    if sub_blobs < 1:
        raise ValueError("sub_blobs must be >= 1")
    raw = src.read() if not isinstance(src, bytes | bytearray | memoryview) else bytes(src)
    tar = _decompress(raw)
    entries = _sort_entries(tar, prioritized, allow_missing_prioritized)
    out = _MemberWriter(compression_level)
    toc: list[_TocEntry] = []
    for part in _divide_entries(entries, sub_blobs):
        _append_part(out, toc, tar, part, chunk_size if chunk_size > 0 else DEFAULT_CHUNK_SIZE)
        out.close_member()
    toc_offset = out.tell()
    toc_json = _toc_json(toc)
    tw = write_header(Header(typeflag=TYPE_REG, name=TOC_TAR_NAME.encode(), size=len(toc_json)))
    out.write(tw + toc_json + b"\0" * pad(len(toc_json)) + b"\0" * 1024)
    out.close_member()
    out.raw(_footer(toc_offset))
    return EstargzResult(
        blob=bytes(out.buf),
        toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
        uncompressed_size=out.uncompressed_size,
        diff_id="sha256:" + out.diff_hash.hexdigest(),
        toc_offset=toc_offset,
    )


# --------------------------------------------------------------------------------------
# Input


def _decompress(raw: bytes) -> bytes:
    # Same detection as build.go:decompressBlob (fewer than 4 bytes: taken as plain tar).
    if len(raw) >= 4 and raw[:3] == b"\x1f\x8b\x08":
        try:
            return _gunzip_all(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise FormatError(f"input is not a valid gzip stream: {exc}") from exc
    if len(raw) >= 4 and raw[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        try:
            with zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(raw), read_across_frames=True
            ) as reader:
                data: bytes = reader.readall()
                return data
        except zstandard.ZstdError as exc:
            raise FormatError(f"input is not a valid zstd stream: {exc}") from exc
    return raw


def _gunzip_all(raw: bytes) -> bytes:
    # Multi-member like Go's gzip.Reader; trailing zero padding after a member is tolerated
    # the way gzip(1) does, anything else is an error.
    out = bytearray()
    data = raw
    while data:
        d = zlib.decompressobj(31)
        out += d.decompress(data)
        if not d.eof:
            raise EOFError("truncated gzip member")
        data = d.unused_data
        if data and data[:2] != b"\x1f\x8b":
            if data.strip(b"\0"):
                raise OSError("garbage after gzip member")
            break
    return bytes(out)


# --------------------------------------------------------------------------------------
# build.go: importTar, sortEntries, moveRec, divideEntries


@dataclass(slots=True)
class _Entry:
    header: Header
    payload: tuple[int, int]  # (offset, length) in the uncompressed input; or landmark


_LANDMARK_PAYLOAD = (-1, 1)


def _import_tar(tar: bytes) -> dict[bytes, _Entry]:
    files: dict[bytes, _Entry] = {}  # insertion order = stream order; keys are clean names
    pos = 0
    while True:
        try:
            r = next_entry(tar, pos)
        except TarError as exc:
            raise FormatError(f"failed to parse tar: {exc}") from exc
        if r is None:
            return files
        h, data, pos = r
        name = clean_entry_name(h.name)
        if name in (PREFETCH_LANDMARK.encode(), NO_PREFETCH_LANDMARK.encode()):
            continue
        # A later entry of the same name replaces the earlier one and moves to the end.
        files.pop(name, None)
        files[name] = _Entry(h, (data, h.size))


def _move_rec(name: bytes, src: dict[bytes, _Entry], dst: dict[bytes, _Entry]) -> bool:
    name = clean_entry_name(name)
    if not name:
        if name in src:
            dst[name] = src.pop(name)
        return True
    if name not in src and name not in dst:
        return False
    parent, _ = go_path_split(name.rstrip(b"/"))
    if not _move_rec(parent, src, dst):
        return False
    e = src.get(name)
    if (
        e is not None
        and e.header.typeflag == TYPE_LINK
        and not _move_rec(e.header.linkname, src, dst)
    ):
        return False
    e = src.pop(name, None)
    if e is not None:
        dst[name] = e
    return True


def _sort_entries(tar: bytes, prioritized: Sequence[str], allow_missing: bool) -> list[_Entry]:
    intar = _import_tar(tar)
    out: dict[bytes, _Entry] = {}
    for p in prioritized:
        if not _move_rec(p.encode("utf-8", "surrogateescape"), intar, out):
            if allow_missing:
                continue
            raise FormatError(f"prioritized file {p!r} (or a parent directory) is not in the tar")
    landmark = NO_PREFETCH_LANDMARK if not prioritized else PREFETCH_LANDMARK
    out[landmark.encode()] = _Entry(
        Header(typeflag=TYPE_REG, name=landmark.encode(), size=len(LANDMARK_CONTENTS)),
        _LANDMARK_PAYLOAD,
    )
    return [*out.values(), *intar.values()]


def _divide_entries(entries: list[_Entry], min_parts: int) -> list[list[_Entry]]:
    estimated = sum(e.header.size for e in entries)
    # Go's int64 division truncates toward zero.
    unit = abs(estimated) // min_parts * (1 if estimated >= 0 else -1)
    next_end, offset = unit, 0
    parts: list[list[_Entry]] = [[]]
    for e in entries:
        parts[-1].append(e)
        offset += e.header.size
        if offset > next_end:
            parts.append([])
            next_end += unit
    return parts


# --------------------------------------------------------------------------------------
# Output: gzip members, TOC entries, TOC JSON, footer


_MAX_STORED = 65535


class _MemberWriter:
    """Concatenated gzip members, written the way Go's gzip.Writer frames them."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.buf = bytearray()
        self.diff_hash = hashlib.sha256()
        self.uncompressed_size = 0
        self._z: zlib._Compress | None = None
        self._open = False
        self._stored = bytearray()  # level 0: pending bytes of the current stored block
        self._crc = 0
        self._isize = 0
        # gzip.Writer header: no name, MTIME 0, XFL from the level, OS 255 (unknown).
        xfl = 2 if level == 9 else 4 if level == 1 else 0
        self._header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 0xFF])

    def tell(self) -> int:
        return len(self.buf)

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if not self._open:
            self._open = True
            if self.level != 0:
                self._z = zlib.compressobj(self.level, zlib.DEFLATED, -15)
            self._crc = 0
            self._isize = 0
            self.buf += self._header
        self.diff_hash.update(data)
        self.uncompressed_size += len(data)
        self._crc = zlib.crc32(data, self._crc)
        self._isize += len(data)
        if self._z is not None:
            self.buf += self._z.compress(data)
            return
        # Level 0 reproduces Go's compress/flate NoCompression framing exactly: 65535-byte
        # non-final stored blocks, the rest in one more at Close, then an empty final block.
        # This makes level-0 blobs byte-identical to the Go builder's.
        self._stored += data
        while len(self._stored) >= _MAX_STORED:
            self._store(self._stored[:_MAX_STORED])
            del self._stored[:_MAX_STORED]

    def _store(self, block: bytes | bytearray, final: bool = False) -> None:
        n = len(block)
        self.buf += struct.pack("<BHH", 1 if final else 0, n, n ^ 0xFFFF)
        self.buf += block

    def close_member(self) -> None:
        if not self._open:
            return
        if self._z is not None:
            self.buf += self._z.flush(zlib.Z_FINISH)
        else:
            if self._stored:
                self._store(self._stored)
                self._stored.clear()
            self._store(b"", final=True)
        self.buf += struct.pack("<II", self._crc, self._isize & 0xFFFFFFFF)
        self._z = None
        self._open = False

    def raw(self, data: bytes) -> None:
        self.buf += data


@dataclass(slots=True)
class _TocEntry:
    name: bytes
    type: str
    size: int = 0
    modtime: str = ""
    link_name: bytes = b""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: bytes = b""
    gname: bytes = b""
    offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""

    def to_json(self) -> list[tuple[str, str]]:
        """(key, encoded value) pairs in types.go field order, omitempty applied."""
        f: list[tuple[str, str]] = [("name", _go_json_str(self.name)), ("type", f'"{self.type}"')]
        ints = (("size", self.size),)
        f += [(k, str(v)) for k, v in ints if v]
        if self.modtime:
            f.append(("modtime", f'"{self.modtime}"'))
        if self.link_name:
            f.append(("linkName", _go_json_str(self.link_name)))
        f += [(k, str(v)) for k, v in (("mode", self.mode), ("uid", self.uid), ("gid", self.gid))
              if v]  # fmt: skip
        if self.uname:
            f.append(("userName", _go_json_str(self.uname)))
        if self.gname:
            f.append(("groupName", _go_json_str(self.gname)))
        f += [
            (k, str(v))
            for k, v in (
                ("offset", self.offset),
                ("devMajor", self.dev_major),
                ("devMinor", self.dev_minor),
            )
            if v
        ]
        if self.xattrs:
            f.append(("xattrs", ""))  # placeholder, rendered by _toc_json (nested object)
        if self.digest:
            f.append(("digest", f'"{self.digest}"'))
        f += [
            (k, str(v))
            for k, v in (("chunkOffset", self.chunk_offset), ("chunkSize", self.chunk_size))
            if v
        ]
        if self.chunk_digest:
            f.append(("chunkDigest", f'"{self.chunk_digest}"'))
        return f


_TOC_TYPES = {
    TYPE_LINK: "hardlink",
    TYPE_SYMLINK: "symlink",
    TYPE_DIR: "dir",
    TYPE_REG: "reg",
    TYPE_CHAR: "char",
    TYPE_BLOCKDEV: "block",
    TYPE_FIFO: "fifo",
}


def _format_modtime(t: GoTime) -> str:
    if t is None or t[0] == 0:
        return ""
    r = round_second(t)
    sec = unix_seconds(r)
    try:
        dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=sec)
    except OverflowError as exc:
        raise FormatError(f"modification time {sec} out of range") from exc
    # Go's RFC3339 layout zero-pads the year to 4 digits; strftime("%Y") does not on glibc.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}Z"
    )


def _append_part(
    out: _MemberWriter, toc: list[_TocEntry], tar: bytes, part: list[_Entry], chunk_size: int
) -> None:
    """readerFromEntries + Writer.AppendTar for one sub-blob."""
    last_uname: dict[int, bytes] = {}
    last_gname: dict[int, bytes] = {}

    def name_if_changed(m: dict[int, bytes], ident: int, name: bytes) -> bytes:
        if not name or m.get(ident) == name:
            return b""
        m[ident] = name
        return name

    for e in part:
        try:
            # First encoding by readerFromEntries, decoded again by AppendTar's reader,
            # encoded a second time by AppendTar's writer.
            if e.header.typeflag in HEADER_ONLY and e.header.size > 0:
                raise TarError(f"{e.header.name!r}: header-only entry with a non-zero size")
            first = write_header(e.header)
            parsed = next_entry(first, 0, check_data=False)
            if parsed is None or parsed[1] != len(first):
                raise TarError(f"{e.header.name!r}: header does not round-trip")
            h = parsed[0]
            if clean_entry_name(h.name) == TOC_TAR_NAME.encode():
                continue
            typ = _TOC_TYPES.get(h.typeflag)
            if typ is None:
                raise TarError(f"unsupported input tar entry type {chr(h.typeflag)!r}")
            hdr_bytes = write_header(h)
        except TarError as exc:
            raise FormatError(f"failed to convert tar entry: {exc}") from exc
        ent = _TocEntry(
            name=h.name,
            type=typ,
            mode=h.mode,
            uid=h.uid,
            gid=h.gid,
            uname=name_if_changed(last_uname, h.uid, h.uname),
            gname=name_if_changed(last_gname, h.gid, h.gname),
            modtime=_format_modtime(h.mtime),
            xattrs={
                k[len(XATTR_PREFIX) :]: v for k, v in h.pax.items() if k.startswith(XATTR_PREFIX)
            },
        )
        out.write(hdr_bytes)
        if h.typeflag in (TYPE_LINK, TYPE_SYMLINK):
            ent.link_name = h.linkname
        elif h.typeflag == TYPE_REG:
            ent.size = h.size
        elif h.typeflag in (TYPE_CHAR, TYPE_BLOCKDEV):
            ent.dev_major, ent.dev_minor = h.devmajor, h.devminor
        if h.typeflag == TYPE_REG:
            if e.payload is _LANDMARK_PAYLOAD:
                payload = memoryview(LANDMARK_CONTENTS)
            else:
                off, length = e.payload
                payload = memoryview(tar)[off : off + length]
                if len(payload) < length:
                    raise FormatError(f"tar entry {h.name!r}: unexpected end of data")
            reg = ent
            written = 0
            while written < h.size:
                out.close_member()
                n = h.size - written
                if n >= chunk_size:
                    n = ent.chunk_size = chunk_size
                ent.offset = out.tell()
                ent.chunk_offset = written
                piece = payload[written : written + n]
                out.write(piece)
                ent.chunk_digest = "sha256:" + hashlib.sha256(piece).hexdigest()
                toc.append(ent)
                written += n
                ent = _TocEntry(name=h.name, type="chunk")
            if h.size == 0:
                toc.append(reg)
            reg.digest = "sha256:" + hashlib.sha256(payload[: h.size]).hexdigest()
            out.write(b"\0" * pad(h.size))
        else:
            toc.append(ent)


def _go_json_str(s: bytes) -> str:
    """encoding/json string encoding with HTML escaping (go1.19 encode.go)."""
    out = ['"']
    i = 0
    n = len(s)
    while i < n:
        b = s[i]
        if b < 0x80:
            if b >= 0x20 and b not in b'"\\<>&':
                out.append(chr(b))
            elif b in b'"\\':
                out.append("\\" + chr(b))
            elif b == 0x0A:
                out.append("\\n")
            elif b == 0x0D:
                out.append("\\r")
            elif b == 0x09:
                out.append("\\t")
            else:
                out.append(f"\\u00{b:02x}")
            i += 1
            continue
        ch, size = _decode_rune(s, i)
        if ch is None:
            out.append("\\ufffd")
        elif ch in ("\u2028", "\u2029"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
        i += size
    out.append('"')
    return "".join(out)


def _decode_rune(s: bytes, i: int) -> tuple[str | None, int]:
    """utf8.DecodeRuneInString: (char, size) or (None, 1) for an invalid byte."""
    for size in (2, 3, 4):
        try:
            return s[i : i + size].decode("utf-8"), size
        except UnicodeDecodeError:
            continue
    return None, 1


def _toc_json(entries: list[_TocEntry]) -> bytes:
    """json.MarshalIndent(JTOC{Version: 1, Entries: ...}, "", "\\t")."""
    lines = ["{", '\t"version": 1,']
    if not entries:
        lines.append('\t"entries": []')
    else:
        lines.append('\t"entries": [')
        for idx, e in enumerate(entries):
            lines.append("\t\t{")
            fields = e.to_json()
            for j, (k, v) in enumerate(fields):
                comma = "," if j < len(fields) - 1 else ""
                if k == "xattrs":
                    lines.append('\t\t\t"xattrs": {')
                    keys = sorted(e.xattrs)
                    for m, xk in enumerate(keys):
                        xcomma = "," if m < len(keys) - 1 else ""
                        val = base64.b64encode(e.xattrs[xk]).decode()
                        lines.append(f'\t\t\t\t{_go_json_str(xk)}: "{val}"{xcomma}')
                    lines.append("\t\t\t}" + comma)
                else:
                    lines.append(f'\t\t\t"{k}": {v}{comma}')
            lines.append("\t\t}" + ("," if idx < len(entries) - 1 else ""))
        lines.append("\t]")
    lines.append("}")
    return "\n".join(lines).encode("utf-8")


def _footer(toc_offset: int) -> bytes:
    # gzip member with FEXTRA ("SG", "%016xSTARGZ") and an empty stored final block,
    # byte-identical to gzipFooterBytes (NoCompression: XFL 0, OS 255).
    sub = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(sub)) + sub
    footer = (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
        + struct.pack("<H", len(extra))
        + extra
        + b"\x01\x00\x00\xff\xff"
        + b"\x00" * 8
    )
    assert len(footer) == FOOTER_SIZE
    return footer
