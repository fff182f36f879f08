"""A port of the parts of Go's ``archive/tar`` (go1.19) that the eStargz writer exercises.

Why a port rather than :mod:`tarfile`: stargz-snapshotter's builder re-encodes every tar
header with Go's writer, and the header bytes are part of the uncompressed stream (so of
the DiffID) while the header fields (PAX records, sub-second mtimes, formats) end up in the
TOC JSON that the TOC digest covers. Python's tarfile loses sub-second mtimes and does not
tell which format a header used, so Go's reader and writer rules are reproduced here:
:func:`next_entry` reads a header (with its PAX/GNU extensions) and :func:`write_header`
writes one as Go would.

One concern in one module (over 600 lines): the reader and the writer share the format
rules (field layout, numeric encodings, format detection) and are only correct together.

Pure and synchronous: bytes in, bytes out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FMT_V7, _FMT_USTAR, _FMT_PAX, _FMT_GNU, _FMT_STAR = 1, 2, 4, 8, 16
TYPE_REG, TYPE_LINK, TYPE_SYMLINK, TYPE_CHAR, TYPE_BLOCKDEV, TYPE_DIR, TYPE_FIFO = b"0123456"
TYPE_REGA = 0
_XHEADER, _XGLOBAL, _GNU_LONGNAME, _GNU_LONGLINK, _GNU_SPARSE = b"xgLKS"
HEADER_ONLY = frozenset({TYPE_LINK, TYPE_SYMLINK, TYPE_CHAR, TYPE_BLOCKDEV, TYPE_DIR, TYPE_FIFO})
_BASIC_KEYS = frozenset(
    {b"path", b"linkpath", b"size", b"uid", b"gid", b"uname", b"gname", b"mtime", b"atime",
     b"ctime"}
)  # fmt: skip
XATTR_PREFIX = b"SCHILY.xattr."
_MAX_SPECIAL = 1 << 20
_GO_ZERO_TIME_UNIX = -62135596800  # time.Time{} as Unix seconds
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Go's time.Time reduced to what tar needs: (unix seconds, nanoseconds in [0, 1e9)).
# None is the zero time.
GoTime = tuple[int, int] | None


@dataclass(slots=True)
class Header:
    typeflag: int
    name: bytes = b""
    linkname: bytes = b""
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: bytes = b""
    gname: bytes = b""
    mtime: GoTime = None
    atime: GoTime = None
    ctime: GoTime = None
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    pax: dict[bytes, bytes] = field(default_factory=dict)
    format: int = 0


def pad(n: int) -> int:
    return -n & (_BLOCK - 1)


def _go_time(sec: int, nsec: int) -> GoTime:
    sec, nsec = sec + nsec // 1_000_000_000, nsec % 1_000_000_000
    if sec == _GO_ZERO_TIME_UNIX and nsec == 0:
        return None
    return (sec, nsec)


def round_second(t: GoTime) -> GoTime:
    if t is None:
        return None
    sec, nsec = t
    return _go_time(sec + (1 if nsec >= 500_000_000 else 0), 0)


def unix_seconds(t: GoTime) -> int:
    return _GO_ZERO_TIME_UNIX if t is None else t[0]


def _parse_string(b: bytes) -> bytes:
    i = b.find(0)
    return b if i < 0 else b[:i]


_OCTAL_RE = re.compile(rb"[0-7]+")
_DEC_RE = re.compile(rb"[+-]?[0-9]+")


class TarError(Exception):
    pass


def _parse_octal(b: bytes) -> int:
    b = b.strip(b" \x00")
    if not b:
        return 0
    s = _parse_string(b)
    if not _OCTAL_RE.fullmatch(s):
        raise TarError(f"invalid octal field {b!r}")
    x = int(s, 8)
    if x >= 1 << 64:
        raise TarError(f"octal field out of range {b!r}")
    return x - (1 << 64) if x >= 1 << 63 else x


def _parse_numeric(b: bytes) -> int:
    if b and b[0] & 0x80:
        inv = 0xFF if b[0] & 0x40 else 0
        x = 0
        for i, c in enumerate(b):
            c ^= inv
            if i == 0:
                c &= 0x7F
            if x >> 56:
                raise TarError("base-256 field overflows int64")
            x = x << 8 | c
        if x >> 63:
            raise TarError("base-256 field overflows int64")
        return ~x if inv else x
    return _parse_octal(b)


def _parse_int64(v: bytes) -> int:
    if not _DEC_RE.fullmatch(v):
        raise TarError(f"invalid PAX number {v!r}")
    n = int(v)
    if not _INT64_MIN <= n <= _INT64_MAX:
        raise TarError(f"PAX number out of range {v!r}")
    return n


def _parse_pax_time(v: bytes) -> GoTime:
    ss, _, sn = v.partition(b".")
    secs = _parse_int64(ss)
    if not sn:
        return _go_time(secs, 0)
    if sn.strip(b"0123456789"):
        raise TarError(f"invalid PAX time {v!r}")
    nsecs = int(sn[:9].ljust(9, b"0"))
    if ss[:1] == b"-":
        return _go_time(secs, -nsecs)
    return _go_time(secs, nsecs)


def _format_pax_time(t: GoTime) -> bytes:
    sec, nsec = t if t is not None else (_GO_ZERO_TIME_UNIX, 0)
    if nsec == 0:
        return str(sec).encode()
    sign = ""
    if sec < 0:
        sign, sec, nsec = "-", -(sec + 1), -(nsec - 1_000_000_000)
    return f"{sign}{sec}.{nsec:09d}".rstrip("0").encode()


def _valid_pax_record(k: bytes, v: bytes) -> bool:
    if not k or b"=" in k:
        return False
    if k in (b"path", b"linkpath", b"uname", b"gname"):
        return b"\0" not in v
    return b"\0" not in k


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    recs: dict[bytes, bytes] = {}
    s = data
    while s:
        n_str, sp, rest = s.partition(b" ")
        if not sp or not re.fullmatch(rb"[+-]?[0-9]+", n_str):
            raise TarError("invalid PAX record length")
        n = int(n_str)
        if n < 5 or n > len(s):
            raise TarError("invalid PAX record length")
        n -= len(n_str) + 1
        if n <= 0:
            raise TarError("invalid PAX record")
        rec, nl, s = rest[: n - 1], rest[n - 1 : n], rest[n:]
        if nl != b"\n":
            raise TarError("PAX record not newline-terminated")
        k, eq, v = rec.partition(b"=")
        if not eq or not _valid_pax_record(k, v):
            raise TarError(f"invalid PAX record {rec!r}")
        if k in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            raise TarError("GNU sparse files are not supported")
        recs[k] = v
    return recs


def _checksums(blk: bytes) -> tuple[int, int]:
    b = blk[:148] + b"        " + blk[156:]
    unsigned = sum(b)
    signed = unsigned - 256 * sum(1 for c in b if c >= 0x80)
    return unsigned, signed


def _get_format(blk: bytes) -> int:
    try:
        value = _parse_octal(blk[148:156])
    except TarError:
        return 0
    if value not in _checksums(blk):
        return 0
    magic, version, trailer = blk[257:263], blk[263:265], blk[508:512]
    if magic == b"ustar\x00" and trailer == b"tar\x00":
        return _FMT_STAR
    if magic == b"ustar\x00":
        return _FMT_USTAR | _FMT_PAX
    if magic == b"ustar " and version == b" \x00":
        return _FMT_GNU
    return _FMT_V7


def _read_header(buf: bytes, pos: int) -> Header | None:
    """tar.Reader.readHeader: None at the end of the archive."""
    blk = buf[pos : pos + _BLOCK]
    if not blk:
        return None
    if len(blk) < _BLOCK:
        raise TarError("truncated tar header")
    if blk == _ZERO_BLOCK:
        blk2 = buf[pos + _BLOCK : pos + 2 * _BLOCK]
        if not blk2 or blk2 == _ZERO_BLOCK:
            return None
        if len(blk2) < _BLOCK:
            raise TarError("truncated tar archive")
        raise TarError("zero block followed by a non-zero block")
    fmt = _get_format(blk)
    if fmt == 0:
        raise TarError(f"invalid tar header at offset {pos}")
    h = Header(
        typeflag=blk[156],
        name=_parse_string(blk[0:100]),
        linkname=_parse_string(blk[157:257]),
        size=_parse_numeric(blk[124:136]),
        mode=_parse_numeric(blk[100:108]),
        uid=_parse_numeric(blk[108:116]),
        gid=_parse_numeric(blk[116:124]),
        mtime=_go_time(_parse_numeric(blk[136:148]), 0),
    )
    if fmt > _FMT_V7:
        h.uname = _parse_string(blk[265:297])
        h.gname = _parse_string(blk[297:329])
        h.devmajor = _parse_numeric(blk[329:337])
        h.devminor = _parse_numeric(blk[337:345])
        prefix = b""
        if fmt & (_FMT_USTAR | _FMT_PAX):
            h.format = fmt
            prefix = _parse_string(blk[345:500])
            if any(c >= 0x80 for c in blk):
                h.format = 0
            if not all(blk[end - 1] == 0 for end in (136, 108, 116, 124, 148, 337, 345)):
                h.format = 0
        elif fmt & _FMT_STAR:
            prefix = _parse_string(blk[345:476])
            h.atime = _go_time(_parse_numeric(blk[476:488]), 0)
            h.ctime = _go_time(_parse_numeric(blk[488:500]), 0)
        elif fmt & _FMT_GNU:
            h.format = fmt
            try:
                if blk[345]:
                    h.atime = _go_time(_parse_numeric(blk[345:357]), 0)
                if blk[357]:
                    h.ctime = _go_time(_parse_numeric(blk[357:369]), 0)
            except TarError:
                # Pre-Go1.8 writers put a USTAR prefix here (golang.org/issues/12594).
                h.atime = h.ctime = None
                s = _parse_string(blk[345:500])
                if all(0 < c < 0x80 for c in s):
                    prefix = s
                h.format = 0
        if prefix:
            h.name = prefix + b"/" + h.name
    return h


def _merge_pax(h: Header, recs: dict[bytes, bytes]) -> None:
    for k, v in recs.items():
        if not v:
            continue
        if k == b"path":
            h.name = v
        elif k == b"linkpath":
            h.linkname = v
        elif k == b"uname":
            h.uname = v
        elif k == b"gname":
            h.gname = v
        elif k == b"uid":
            h.uid = _parse_int64(v)
        elif k == b"gid":
            h.gid = _parse_int64(v)
        elif k == b"atime":
            h.atime = _parse_pax_time(v)
        elif k == b"mtime":
            h.mtime = _parse_pax_time(v)
        elif k == b"ctime":
            h.ctime = _parse_pax_time(v)
        elif k == b"size":
            h.size = _parse_int64(v)
        elif k.startswith(XATTR_PREFIX):
            h.xattrs[k[len(XATTR_PREFIX) :]] = v
    h.pax = recs


def next_entry(buf: bytes, pos: int, *, check_data: bool = True) -> tuple[Header, int, int] | None:
    """tar.Reader.Next: (header, data offset, offset after data and padding) or None."""
    fmt = _FMT_USTAR | _FMT_PAX | _FMT_GNU
    pax: dict[bytes, bytes] = {}
    long_name = long_link = b""
    while True:
        h = _read_header(buf, pos)
        if h is None:
            return None
        pos += _BLOCK
        nb = 0 if h.typeflag in HEADER_ONLY else h.size
        if nb < 0:
            raise TarError("negative size")
        fmt &= h.format
        if h.typeflag in (_XHEADER, _XGLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
            if nb > _MAX_SPECIAL:
                raise TarError("extended header too long")
            data = buf[pos : pos + nb]
            if len(data) < nb:
                raise TarError("truncated extended header")
            pos += nb + pad(nb)
            if h.typeflag == _XGLOBAL:
                # build.go would keep it as an entry and AppendTar then rejects the type.
                raise TarError("PAX global headers are not supported")
            if h.typeflag == _XHEADER:
                fmt &= _FMT_PAX
                pax = _parse_pax(data)
            else:
                fmt &= _FMT_GNU
                if h.typeflag == _GNU_LONGNAME:
                    long_name = _parse_string(data)
                else:
                    long_link = _parse_string(data)
            continue
        _merge_pax(h, pax)
        if long_name:
            h.name = long_name
        if long_link:
            h.linkname = long_link
        if h.typeflag == TYPE_REGA:
            h.typeflag = TYPE_DIR if h.name.endswith(b"/") else TYPE_REG
        if h.typeflag == _GNU_SPARSE or any(k.startswith(b"GNU.sparse.") for k in h.pax):
            raise TarError("GNU sparse files are not supported")
        nb = 0 if h.typeflag in HEADER_ONLY else h.size
        if nb < 0:
            raise TarError("negative size")
        if fmt & _FMT_USTAR and fmt & _FMT_PAX:
            fmt &= _FMT_USTAR
        h.format = fmt
        if check_data and pos + nb > len(buf):
            raise TarError(f"{h.name!r}: unexpected end of data")
        return h, pos, pos + nb + pad(nb)


def _is_ascii(s: bytes) -> bool:
    return all(0 < c < 0x80 for c in s)


def _to_ascii(s: bytes) -> bytes:
    return bytes(c for c in s if 0 < c < 0x80)


def _fits_base256(n: int, x: int) -> bool:
    bits = (n - 1) * 8
    return n >= 9 or -(1 << bits) <= x < (1 << bits)


def _fits_octal(n: int, x: int) -> bool:
    return x >= 0 and (n >= 22 or x < 1 << ((n - 1) * 3))


def _fmt_string(blk: bytearray, off: int, size: int, s: bytes) -> None:
    n = min(len(s), size)
    blk[off : off + n] = s[:n]
    if len(s) < size:
        blk[off + len(s)] = 0
    if len(s) > size and blk[off + size - 1] == ord("/"):
        blk[off + len(s[:size].rstrip(b"/"))] = 0


def _fmt_octal(blk: bytearray, off: int, size: int, x: int) -> None:
    if not _fits_octal(size, x):
        x = 0
    s = format(x, "o").encode()
    if size - len(s) - 1 > 0:
        s = b"0" * (size - len(s) - 1) + s
    _fmt_string(blk, off, size, s)


def _fmt_numeric(blk: bytearray, off: int, size: int, x: int) -> None:
    if _fits_octal(size, x):
        _fmt_octal(blk, off, size, x)
    elif _fits_base256(size, x):
        v = x & ((1 << (8 * size)) - 1)
        blk[off : off + size] = v.to_bytes(size, "big")
        blk[off] |= 0x80
    else:
        _fmt_octal(blk, off, size, 0)


def _set_format(blk: bytearray, fmt: int) -> None:
    if fmt & _FMT_GNU:
        blk[257:265] = b"ustar  \x00"
    elif fmt & (_FMT_USTAR | _FMT_PAX):
        blk[257:265] = b"ustar\x0000"
    chk, _ = _checksums(bytes(blk))
    _fmt_octal(blk, 148, 7, chk)
    blk[155] = ord(" ")


def _go_path_clean(p: bytes) -> bytes:
    """path.Clean of Go (differs from posixpath.normpath for a leading "//")."""
    if not p:
        return b"."
    rooted = p.startswith(b"/")
    parts: list[bytes] = []
    for el in p.split(b"/"):
        if el in (b"", b"."):
            continue
        if el == b"..":
            if parts and parts[-1] != b"..":
                parts.pop()
            elif not rooted:
                parts.append(b"..")
            continue
        parts.append(el)
    out = b"/".join(parts)
    if rooted:
        return b"/" + out
    return out or b"."


def go_path_split(p: bytes) -> tuple[bytes, bytes]:
    i = p.rfind(b"/")
    return p[: i + 1], p[i + 1 :]


def _go_path_join(*elems: bytes) -> bytes:
    if not any(elems):
        return b""
    buf = b""
    for e in elems:
        if buf or e:
            if buf:
                buf += b"/"
            buf += e
    return _go_path_clean(buf)


def clean_entry_name(name: bytes) -> bytes:
    return _go_path_clean(b"/" + name)[1:]


def _split_ustar_path(name: bytes) -> tuple[bytes, bytes] | None:
    length = len(name)
    if length <= 100 or not _is_ascii(name):
        return None
    if length > 156:
        length = 156
    elif name[length - 1] == ord("/"):
        length -= 1
    i = name[:length].rfind(b"/")
    nlen, plen = len(name) - i - 1, i
    if i <= 0 or nlen > 100 or nlen == 0 or plen > 155:
        return None
    return name[:i], name[i + 1 :]


def _allowed_formats(h: Header) -> tuple[int, dict[bytes, bytes]]:
    """Header.allowedFormats (go1.19 common.go)."""
    fmt = _FMT_USTAR | _FMT_PAX | _FMT_GNU
    pax: dict[bytes, bytes] = {}
    prefer_pax = False

    def verify_string(s: bytes, size: int, key: bytes) -> None:
        nonlocal fmt
        too_long = len(s) > size
        if b"\0" in s or (too_long and key not in (b"path", b"linkpath")):
            fmt &= ~_FMT_GNU
        if not _is_ascii(s) or too_long:
            if key != b"path" or _split_ustar_path(s) is None:
                fmt &= ~_FMT_USTAR
            pax[key] = s
        if h.pax.get(key) == s:
            pax[key] = s

    def verify_numeric(n: int, size: int, key: bytes | None) -> None:
        nonlocal fmt
        if not _fits_base256(size, n):
            fmt &= ~_FMT_GNU
        if not _fits_octal(size, n):
            fmt &= ~_FMT_USTAR
            if key is None:
                fmt &= ~_FMT_PAX
            else:
                pax[key] = str(n).encode()
        if key is not None and h.pax.get(key) == str(n).encode():
            pax[key] = str(n).encode()

    def verify_time(ts: GoTime, size: int, key: bytes) -> None:
        nonlocal fmt, prefer_pax
        if ts is None:
            return
        if not _fits_base256(size, ts[0]):
            fmt &= ~_FMT_GNU
        is_mtime = key == b"mtime"
        fits_octal = _fits_octal(size, ts[0])
        if (is_mtime and not fits_octal) or not is_mtime:
            fmt &= ~_FMT_USTAR
        if not is_mtime or not fits_octal or ts[1] != 0:
            prefer_pax = True
            pax[key] = _format_pax_time(ts)
        if h.pax.get(key) == _format_pax_time(ts):
            pax[key] = _format_pax_time(ts)

    verify_string(h.name, 100, b"path")
    verify_string(h.linkname, 100, b"linkpath")
    verify_string(h.uname, 32, b"uname")
    verify_string(h.gname, 32, b"gname")
    verify_numeric(h.mode, 8, None)
    verify_numeric(h.uid, 8, b"uid")
    verify_numeric(h.gid, 8, b"gid")
    verify_numeric(h.size, 12, b"size")
    verify_numeric(h.devmajor, 8, None)
    verify_numeric(h.devminor, 8, None)
    verify_time(h.mtime, 12, b"mtime")
    verify_time(h.atime, 12, b"atime")
    verify_time(h.ctime, 12, b"ctime")

    file_types = (TYPE_REG, TYPE_CHAR, TYPE_BLOCKDEV, TYPE_FIFO, _GNU_SPARSE)
    if h.typeflag in file_types and h.name.endswith(b"/"):
        raise TarError(f"{h.name!r}: filename may not have trailing slash")
    if h.typeflag not in HEADER_ONLY and h.size < 0:
        raise TarError("negative size")
    if h.xattrs:
        for k, v in h.xattrs.items():
            pax[XATTR_PREFIX + k] = v
        fmt &= _FMT_PAX
    if h.pax:
        for k, v in h.pax.items():
            if k in pax:
                continue
            if k not in _BASIC_KEYS and not k.startswith(b"GNU.sparse."):
                pax[k] = v
        fmt &= _FMT_PAX
    for k, v in pax.items():
        if not _valid_pax_record(k, v):
            raise TarError(f"invalid PAX record {k!r}")
    if h.format:
        want = h.format
        if want & _FMT_PAX and not prefer_pax:
            want |= _FMT_USTAR
        fmt &= want
    return fmt, pax


def _format_pax_record(k: bytes, v: bytes) -> bytes:
    size = len(k) + len(v) + 3
    size += len(str(size))
    rec = str(size).encode() + b" " + k + b"=" + v + b"\n"
    if len(rec) != size:
        rec = str(len(rec)).encode() + b" " + k + b"=" + v + b"\n"
    return rec


def _template_v7plus(h: Header, numeric: bool, ascii_only: bool) -> bytearray:
    blk = bytearray(_BLOCK)
    fnum = _fmt_numeric if numeric else _fmt_octal

    def fstr(off: int, size: int, s: bytes) -> None:
        _fmt_string(blk, off, size, _to_ascii(s) if ascii_only else s)

    mtime = 0 if h.mtime is None else h.mtime[0]
    blk[156] = h.typeflag
    fstr(0, 100, h.name)
    fstr(157, 100, h.linkname)
    fnum(blk, 100, 8, h.mode)
    fnum(blk, 108, 8, h.uid)
    fnum(blk, 116, 8, h.gid)
    fnum(blk, 124, 12, h.size)
    fnum(blk, 136, 12, mtime)
    fstr(265, 32, h.uname)
    fstr(297, 32, h.gname)
    fnum(blk, 329, 8, h.devmajor)
    fnum(blk, 337, 8, h.devminor)
    return blk


def _raw_file(name: bytes, data: bytes, flag: int, fmt: int) -> bytes:
    blk = bytearray(_BLOCK)
    name = _to_ascii(name)[:100].rstrip(b"/")
    blk[156] = flag
    _fmt_string(blk, 0, 100, name)
    for off, size in ((100, 8), (108, 8), (116, 8), (136, 12)):
        _fmt_octal(blk, off, size, 0)
    _fmt_octal(blk, 124, 12, len(data))
    _set_format(blk, fmt)
    return bytes(blk) + data + b"\0" * pad(len(data))


def write_header(hdr: Header) -> bytes:
    """tar.Writer.WriteHeader: every block it writes before the file's data."""
    h = replace(hdr)
    if h.typeflag == TYPE_REGA:
        h.typeflag = TYPE_DIR if h.name.endswith(b"/") else TYPE_REG
    if h.format == 0:
        h.mtime = round_second(h.mtime)
        h.atime = h.ctime = None
    fmt, pax = _allowed_formats(h)
    if fmt & _FMT_USTAR:
        name_prefix = b""
        split = _split_ustar_path(h.name)
        if split is not None:
            name_prefix, h.name = split
        blk = _template_v7plus(h, numeric=False, ascii_only=False)
        _fmt_string(blk, 345, 155, name_prefix)
        _set_format(blk, _FMT_USTAR)
        return bytes(blk)
    if fmt & _FMT_PAX:
        out = b""
        if pax:
            data = b"".join(_format_pax_record(k, pax[k]) for k in sorted(pax))
            if len(data) > _MAX_SPECIAL:
                raise TarError("PAX header too long")
            d, f = go_path_split(h.name)
            out = _raw_file(_go_path_join(d, b"PaxHeaders.0", f), data, _XHEADER, _FMT_PAX)
        blk = _template_v7plus(h, numeric=False, ascii_only=True)
        _set_format(blk, _FMT_PAX)
        return out + bytes(blk)
    if fmt & _FMT_GNU:
        out = b""
        if len(h.name) > 100:
            out += _raw_file(b"././@LongLink", h.name + b"\0", _GNU_LONGNAME, _FMT_GNU)
        if len(h.linkname) > 100:
            out += _raw_file(b"././@LongLink", h.linkname + b"\0", _GNU_LONGLINK, _FMT_GNU)
        blk = _template_v7plus(h, numeric=True, ascii_only=False)
        if h.atime is not None:
            _fmt_numeric(blk, 345, 12, h.atime[0])
        if h.ctime is not None:
            _fmt_numeric(blk, 357, 12, h.ctime[0])
        _set_format(blk, _FMT_GNU)
        return out + bytes(blk)
    raise TarError(f"{h.name!r}: header cannot be encoded in any tar format")


