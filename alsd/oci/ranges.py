"""HTTP byte ranges, sans-I/O: Range headers, Content-Range, multipart/byteranges bodies.

Ranges are ``(start, end)`` with ``end`` exclusive everywhere in alsd; only the HTTP
text uses inclusive ends (RFC 9110 §14). Malformed answers raise :class:`RegistryError`
because they come from a registry. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from alsd.errors import RegistryError

_CONTENT_RANGE_RE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RE = re.compile(r"\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def check_ranges(ranges: Sequence[tuple[int, int]]) -> None:
    for start, end in ranges:
        if start < 0 or end <= start:
            raise ValueError(f"bad byte range [{start}, {end})")


def merge_ranges(ranges: Sequence[tuple[int, int]], *, gap: int = 0) -> list[tuple[int, int]]:
    """Sort and merge overlapping ranges, and ranges at most ``gap`` bytes apart."""
    check_ranges(ranges)
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + gap:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def range_header(ranges: Sequence[tuple[int, int]]) -> str:
    """``bytes=a-b,c-d`` for the merged ranges (inclusive HTTP ends)."""
    merged = merge_ranges(ranges)
    if not merged:
        raise ValueError("no ranges")
    return "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in merged)


@dataclass(frozen=True, slots=True)
class ContentRange:
    start: int
    end: int  # exclusive
    total: int | None  # None for "*"

    @property
    def length(self) -> int:
        return self.end - self.start


def parse_content_range(value: str) -> ContentRange:
    m = _CONTENT_RANGE_RE.match(value)
    if not m:
        raise RegistryError(f"malformed Content-Range {value!r}")
    start, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < start or (total is not None and last >= total):
        raise RegistryError(f"inconsistent Content-Range {value!r}")
    return ContentRange(start, last + 1, total)


def parse_unsatisfied_range(value: str) -> int | None:
    """The total size from a 416's ``Content-Range: bytes */N``, if present."""
    m = _UNSATISFIED_RE.match(value)
    return int(m.group(1)) if m else None


def multipart_boundary(content_type: str) -> str | None:
    """The boundary of a ``multipart/byteranges`` Content-Type, else None."""
    main, _, params = content_type.partition(";")
    if main.strip().lower() != "multipart/byteranges":
        return None
    for p in params.split(";"):
        k, _, v = p.strip().partition("=")
        if k.strip().lower() == "boundary":
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            if v:
                return v
    raise RegistryError(f"multipart/byteranges without a boundary: {content_type!r}")


def parse_multipart_byteranges(body: bytes, boundary: str) -> list[tuple[ContentRange, bytes]]:
    """Parse a ``multipart/byteranges`` body into (Content-Range, bytes) parts.

    Each part's length is taken from its Content-Range (the payload may itself contain
    the boundary text), and checked against the body.
    """
    delim = b"--" + boundary.encode("latin-1")
    parts: list[tuple[ContentRange, bytes]] = []
    pos = body.find(delim)
    if pos < 0:
        raise RegistryError("multipart/byteranges body has no boundary")
    while True:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return parts
        # Headers end at the first empty line.
        hdr_end = body.find(b"\r\n\r\n", pos)
        sep = 4
        if hdr_end < 0:
            hdr_end, sep = body.find(b"\n\n", pos), 2
        if hdr_end < 0:
            raise RegistryError("multipart/byteranges part without a header end (truncated?)")
        cr: ContentRange | None = None
        for line in body[pos:hdr_end].decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-range":
                cr = parse_content_range(value)
        if cr is None:
            raise RegistryError("multipart/byteranges part without Content-Range")
        data_start = hdr_end + sep
        data_end = data_start + cr.length
        if data_end > len(body):
            raise RegistryError(
                f"multipart/byteranges part {cr.start}-{cr.end - 1} truncated: "
                f"{len(body) - data_start} of {cr.length} bytes"
            )
        parts.append((cr, body[data_start:data_end]))
        nxt = body.find(delim, data_end)
        if nxt < 0:
            # A body that ends without the closing delimiter lost its tail.
            raise RegistryError("multipart/byteranges body without closing boundary")
        pos = nxt


def slice_ranges(
    parts: Sequence[tuple[int, bytes]], wanted: Sequence[tuple[int, int]]
) -> list[bytes]:
    """For each wanted range, the bytes cut from the part (start offset, data) holding it.

    Raises :class:`RegistryError` if the parts do not cover a wanted range.
    """
    out: list[bytes] = []
    for start, end in wanted:
        for pstart, data in parts:
            if pstart <= start and end <= pstart + len(data):
                out.append(data[start - pstart : end - pstart])
                break
        else:
            raise RegistryError(f"registry answer does not cover bytes {start}-{end - 1}")
    return out


def bodies_fit(bodies: Sequence[bytes], ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether ``bodies`` are exactly one body of the right length per range."""
    return len(bodies) == len(ranges) and all(
        len(b) == e - s for b, (s, e) in zip(bodies, ranges, strict=False)
    )
