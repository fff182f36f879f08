"""Range headers, Content-Range and multipart/byteranges bodies."""

from __future__ import annotations

import pytest

from alsd.errors import RegistryError
from alsd.oci.ranges import (
    ContentRange,
    merge_ranges,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
    parse_unsatisfied_range,
    range_header,
    slice_ranges,
)


def test_merge_and_header() -> None:
    assert merge_ranges([(10, 20), (0, 5), (5, 8), (15, 30), (40, 41)]) == [
        (0, 8),
        (10, 30),
        (40, 41),
    ]
    assert merge_ranges([(0, 5), (7, 9)], gap=2) == [(0, 9)]
    assert merge_ranges([(0, 5), (8, 9)], gap=2) == [(0, 5), (8, 9)]
    assert range_header([(100, 200), (0, 1)]) == "bytes=0-0,100-199"
    with pytest.raises(ValueError):
        range_header([])
    with pytest.raises(ValueError):
        merge_ranges([(5, 5)])
    with pytest.raises(ValueError):
        merge_ranges([(-1, 5)])


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("bytes 0-1/2", ContentRange(0, 2, 2)),
        ("bytes 100-199/1000", ContentRange(100, 200, 1000)),
        ("Bytes  5-5/*", ContentRange(5, 6, None)),
    ],
)
def test_content_range(value: str, want: ContentRange) -> None:
    assert parse_content_range(value) == want


@pytest.mark.parametrize(
    "value", ["", "bytes 5-4/10", "bytes 0-10/10", "items 0-1/2", "bytes */10"]
)
def test_content_range_bad(value: str) -> None:
    with pytest.raises(RegistryError):
        parse_content_range(value)


def test_unsatisfied() -> None:
    assert parse_unsatisfied_range("bytes */1234") == 1234
    assert parse_unsatisfied_range("bytes 0-1/2") is None


def test_boundary() -> None:
    assert multipart_boundary("multipart/byteranges; boundary=abc") == "abc"
    assert multipart_boundary('Multipart/ByteRanges; charset=x; boundary="a b"') == "a b"
    assert multipart_boundary("application/octet-stream") is None
    with pytest.raises(RegistryError):
        multipart_boundary("multipart/byteranges")


# What Go's http.ServeContent (docker-registry's filesystem driver) sends; the second
# payload contains the boundary text itself, which must not end the part early.
BODY = (
    b"\r\n--XYZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-4/100\r\n\r\n"
    b"hello"
    b"\r\n--XYZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 50-60/100\r\n\r\n"
    b"--XYZ--\r\nab"
    b"\r\n--XYZ--\r\n"
)


def test_multipart() -> None:
    parts = parse_multipart_byteranges(BODY, "XYZ")
    assert parts == [
        (ContentRange(0, 5, 100), b"hello"),
        (ContentRange(50, 61, 100), b"--XYZ--\r\nab"),
    ]


def test_multipart_lf_only_headers() -> None:
    body = b"--B\nContent-Range: bytes 2-3/9\n\nxy\n--B--\n"
    assert parse_multipart_byteranges(body, "B") == [(ContentRange(2, 4, 9), b"xy")]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (BODY[:100], "truncated|header end"),
        (BODY[: BODY.rindex(b"\r\n--XYZ--")], "closing boundary"),
        (b"no boundary here", "no boundary"),
        (b"--XYZ\r\nContent-Type: x\r\n\r\nabc\r\n--XYZ--", "without Content-Range"),
    ],
)
def test_multipart_bad(body: bytes, why: str) -> None:
    with pytest.raises(RegistryError, match=why):
        parse_multipart_byteranges(body, "XYZ")


def test_slice() -> None:
    parts = [(0, b"0123456789"), (100, b"abcdef")]
    assert slice_ranges(parts, [(2, 4), (101, 103), (0, 10)]) == [b"23", b"bc", b"0123456789"]
    with pytest.raises(RegistryError, match="does not cover bytes 9-10"):
        slice_ranges(parts, [(9, 11)])
