"""eStargz and legacy stargz: footers, the TOC member, and gzip chunk decoding (sans-I/O).

Layout and rules: spec.md section 3.  A blob is a concatenation of gzip members; the TOC
is the tar entry ``stargz.index.json`` in its own member at the offset the footer names.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from alsd.errors import FormatError, IntegrityError, NotLazyError
from alsd.oci.tar import BLOCK, parse_header

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
EXTERNAL_TOC_FOOTER_SIZE = 46
TOC_TAR_NAME = "stargz.index.json"

_GZIP_HEAD = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True, slots=True)
class GzipFooter:
    legacy: bool  # True: CRFS stargz (47 bytes), False: eStargz (51 bytes)
    toc_offset: int
    size: int


def _is_empty_gzip_member(footer: bytes) -> bool:
    d = zlib.decompressobj(31)
    try:
        out = d.decompress(footer)
    except zlib.error:
        return False
    return out == b"" and d.eof and not d.unused_data


def _hex_offset(text: bytes) -> int | None:
    try:
        return int(text.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        return None


def parse_footer(tail: bytes) -> GzipFooter | None:
    """Recognise an eStargz (51 B) or legacy stargz (47 B) footer at the end of ``tail``.

    Returns None if neither is there; raises NotLazyError for the external-TOC variant,
    which needs a separate TOC image that alsd does not fetch.
    """
    if len(tail) >= ESTARGZ_FOOTER_SIZE:
        f = tail[-ESTARGZ_FOOTER_SIZE:]
        if (
            f[:10] == _GZIP_HEAD
            and f[10:12] == b"\x1a\x00"
            and f[12:16] == b"SG\x16\x00"
            and f[32:38] == b"STARGZ"
            and _is_empty_gzip_member(f)
        ):
            off = _hex_offset(f[16:32])
            if off is not None:
                return GzipFooter(False, off, ESTARGZ_FOOTER_SIZE)
    if len(tail) >= LEGACY_FOOTER_SIZE:
        f = tail[-LEGACY_FOOTER_SIZE:]
        if (
            f[:10] == _GZIP_HEAD
            and f[10:12] == b"\x16\x00"
            and f[28:34] == b"STARGZ"
            and _is_empty_gzip_member(f)
        ):
            off = _hex_offset(f[12:28])
            if off is not None:
                return GzipFooter(True, off, LEGACY_FOOTER_SIZE)
    if len(tail) >= EXTERNAL_TOC_FOOTER_SIZE:
        f = tail[-EXTERNAL_TOC_FOOTER_SIZE:]
        if (
            f[:10] == _GZIP_HEAD
            and f[10:12] == b"\x15\x00"
            and f[12:16] == b"SG\x11\x00"
            and (f[16:33] == b"STARGZEXTERNALTOC")
        ):
            raise NotLazyError("eStargz with an external TOC is not supported")
    return None


def extract_toc(member: bytes, max_toc_bytes: int) -> bytes:
    """Return the raw JSON bytes of the TOC tar entry held in the gzip ``member``.

    Decompression is bounded: at most one tar header plus ``max_toc_bytes`` are produced,
    so an oversized or bomb-like TOC is refused without inflating it.
    """
    d = zlib.decompressobj(31)
    try:
        head = _inflate(d, member, BLOCK)
        if len(head) < BLOCK:
            raise FormatError("TOC truncated: no complete tar header")
        hdr = parse_header(head)
        if hdr.name.removeprefix("./") != TOC_TAR_NAME:
            raise FormatError(f"TOC member holds {hdr.name!r}, not {TOC_TAR_NAME}")
        if hdr.size > max_toc_bytes:
            raise FormatError(f"TOC of {hdr.size} bytes exceeds the limit of {max_toc_bytes}")
        # One piece in practice (the header block came alone): no copy of the TOC.
        pieces = [head[BLOCK:]] if len(head) > BLOCK else []
        rest = hdr.size - (len(head) - BLOCK)
        data = d.unconsumed_tail
        while rest > 0 and not d.eof:
            got = d.decompress(data, rest)
            pieces.append(got)
            rest -= len(got)
            data = d.unconsumed_tail
            if not got and not data:
                break  # input exhausted and nothing pending inside zlib
    except zlib.error as exc:
        raise FormatError(f"TOC member is not valid gzip: {exc}") from exc
    if rest > 0:
        raise FormatError(f"TOC truncated: {hdr.size - rest} of {hdr.size} bytes")
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _inflate(d: zlib._Decompress, data: bytes, want: int) -> bytes:
    out = bytearray()
    while len(out) < want and not d.eof:
        got = d.decompress(data, want - len(out))
        out += got
        data = d.unconsumed_tail
        if not got and not data:
            break  # input exhausted and nothing pending inside zlib
    return bytes(out)


# Uncompressed bytes skipped before a chunk are inflated and dropped in pieces this large.
SKIP_PIECE = 1 << 20


def gunzip_chunk(compressed: bytes, skip: int, size: int) -> bytes:
    """Inflate gzip members from the start of ``compressed``; skip ``skip``, return ``size``.

    A fetch range may span several members (uncounted sub-blob boundaries, tar headers)
    and may end with TOC/footer bytes: we go across members and stop after enough bytes.
    Bounded whatever the members inflate to: zlib never produces more than ``skip + size``
    bytes, the skipped ones are dropped in pieces of at most ``SKIP_PIECE`` bytes, so at
    most ``size`` bytes of output are ever held (plus one piece); a member that inflates
    past the declared size is not inflated further (its digest check then fails).
    Raises IntegrityError on corrupt or insufficient data (the caller adds the context).
    """
    want = skip + size
    done = 0  # bytes produced so far, skipped ones included
    pieces: list[bytes] = []
    buf = compressed
    try:
        while done < want:
            if not buf:
                raise IntegrityError(f"compressed range ends after {done} of {want} bytes")
            d = zlib.decompressobj(31)
            inp = buf
            while done < want:
                limit = min(skip - done, SKIP_PIECE) if done < skip else want - done
                got = d.decompress(inp, limit)
                if done >= skip:
                    pieces.append(got)
                done += len(got)
                if d.eof:
                    break
                inp = d.unconsumed_tail
                if not inp and not got:
                    raise IntegrityError(f"compressed range ends after {done} of {want} bytes")
            buf = d.unused_data if d.eof else b""
    except zlib.error as exc:
        raise IntegrityError(f"corrupt gzip data: {exc}") from exc
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
