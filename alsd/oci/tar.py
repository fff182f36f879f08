"""A tiny tar header reader (sans-I/O): just enough to find the TOC entry of an eStargz blob.

Only the fields alsd needs are decoded (name, size, type flag), with the checksum checked
so that a corrupt TOC member is reported as such instead of being misread.
"""

from __future__ import annotations

from dataclasses import dataclass

from alsd.errors import FormatError

BLOCK = 512


@dataclass(frozen=True, slots=True)
class TarHeader:
    name: str
    size: int
    typeflag: bytes


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        # GNU base-256 encoding for big numbers; the first byte's high bit is a marker.
        value = field[0] & 0x7F
        for byte in field[1:]:
            value = (value << 8) | byte
        return value
    text = field.replace(b"\x00", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as exc:
        raise FormatError(f"tar header: bad {what} field {field!r}") from exc


def parse_header(block: bytes) -> TarHeader:
    """Decode one 512-byte USTAR/GNU header; FormatError if it is not one."""
    if len(block) < BLOCK:
        raise FormatError("tar header: truncated")
    block = block[:BLOCK]
    if block == bytes(BLOCK):
        raise FormatError("tar header: unexpected end-of-archive block")
    stored = _octal(block[148:156], "checksum")
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != computed:
        raise FormatError(f"tar header: checksum mismatch ({stored} != {computed})")
    name = block[0:100].split(b"\x00", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\x00", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return TarHeader(
        name=name.decode("utf-8", "surrogateescape"),
        size=_octal(block[124:136], "size"),
        typeflag=block[156:157],
    )
