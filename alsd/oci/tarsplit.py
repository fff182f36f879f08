"""The tar-split stream of current zstd:chunked layers (sans-I/O).

tar-split (vbatts/tar-split) is zstd-compressed JSON lines: ``{"type":1, "size": N, ...}``
for a file payload of N bytes and ``{"type":2, "payload": "<base64>"}`` for raw tar bytes
(headers, padding, EOF blocks).  The uncompressed tar size (the ALS ``diff-size``) is the
sum of both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from alsd.errors import FormatError, IntegrityError
from alsd.oci.zstdchunked import decompress_bounded

ENTRY_FILE = 1
ENTRY_SEGMENT = 2
DEFAULT_MAX_TARSPLIT_BYTES = 1 << 30


def verify_tarsplit(compressed: bytes, expected_digest: str) -> None:
    """Check the TOC's ``tarSplitDigest`` (sha256 of the compressed tar-split)."""
    actual = "sha256:" + hashlib.sha256(compressed).hexdigest()
    if actual != expected_digest:
        raise IntegrityError(f"tar-split digest {actual} != expected {expected_digest}")


def tarsplit_uncompressed_size(
    tarsplit_compressed: bytes, *, max_bytes: int = DEFAULT_MAX_TARSPLIT_BYTES
) -> int:
    """Size of the tar stream the tar-split describes; FormatError if it is malformed."""
    text = decompress_bounded(tarsplit_compressed, max_bytes, "tar-split")
    total = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise FormatError(f"tar-split line {lineno}: not JSON") from exc
        if not isinstance(entry, dict):
            raise FormatError(f"tar-split line {lineno}: not an object")
        typ = entry.get("type")
        if typ == ENTRY_FILE:
            size = entry.get("size", 0)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise FormatError(f"tar-split line {lineno}: bad size {size!r}")
            total += size
        elif typ == ENTRY_SEGMENT:
            payload = entry.get("payload") or ""
            if not isinstance(payload, str):
                raise FormatError(f"tar-split line {lineno}: payload is not base64")
            try:
                total += len(base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise FormatError(f"tar-split line {lineno}: payload is not base64") from exc
        else:
            raise FormatError(f"tar-split line {lineno}: unknown type {typ!r}")
    return total
