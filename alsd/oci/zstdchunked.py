"""zstd:chunked: footers, manifest positions, the manifest, and zstd chunk decoding (sans-I/O).

Two producers write this format (spec.md section 4): containers/storage (2020 layout with a
40-byte footer and magic "GnUlInUx"; since v1.50 a 64-byte footer, magic "GNUlInUx" and a
tar-split) and stargz-snapshotter (eStargz semantics with zstd frames, 40-byte footer).
The manifest and footer live in zstd *skippable* frames, which zstd decoders ignore.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from alsd.errors import FormatError, IntegrityError

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
MAGIC_OLD = b"GnUlInUx"  # c/storage < 1.50 and stargz-snapshotter
MAGIC_NEW = b"GNUlInUx"  # c/storage >= 1.50
FOOTER_OLD_SIZE = 40
FOOTER_NEW_SIZE = 64
SKIPPABLE_HEADER_SIZE = 8
MANIFEST_TYPE_CRFS = 1


@dataclass(frozen=True, slots=True)
class ZstdFooter:
    new_layout: bool  # 64-byte footer with tar-split position
    manifest_offset: int  # after the skippable frame header
    manifest_length: int  # compressed
    manifest_uncompressed: int
    manifest_type: int
    tarsplit: tuple[int, int, int] | None  # (offset, compressed, uncompressed)
    size: int  # bytes at the end of the blob taken by the footer frame


def parse_footer(tail: bytes) -> ZstdFooter | None:
    """Recognise a 64-byte ("GNUlInUx") or 40-byte ("GnUlInUx") footer frame, or None."""
    n = SKIPPABLE_HEADER_SIZE + FOOTER_NEW_SIZE
    if (
        len(tail) >= n
        and tail[-n:][:8] == SKIPPABLE_MAGIC + struct.pack("<I", FOOTER_NEW_SIZE)
        and tail[-8:] == MAGIC_NEW
    ):
        mo, ml, mu, mt, to, tl, tu = struct.unpack("<7Q", tail[-FOOTER_NEW_SIZE:-8])
        return ZstdFooter(True, mo, ml, mu, mt, (to, tl, tu), n)
    n = SKIPPABLE_HEADER_SIZE + FOOTER_OLD_SIZE
    if (
        len(tail) >= n
        and tail[-n:][:8] == SKIPPABLE_MAGIC + struct.pack("<I", FOOTER_OLD_SIZE)
        and tail[-8:] == MAGIC_OLD
    ):
        mo, ml, mu, mt = struct.unpack("<4Q", tail[-FOOTER_OLD_SIZE:-8])
        return ZstdFooter(False, mo, ml, mu, mt, None, n)
    return None


def parse_position(value: str, fields: int, key: str) -> tuple[int, ...]:
    """Parse an annotation like ``"<offset>:<compressed>:<uncompressed>[:<type>]"``."""
    parts = value.split(":")
    if len(parts) != fields:
        raise FormatError(f"annotation {key}={value!r}: expected {fields} fields")
    try:
        nums = tuple(int(p, 10) for p in parts)
    except ValueError as exc:
        raise FormatError(f"annotation {key}={value!r}: not decimal numbers") from exc
    if any(x < 0 for x in nums):
        raise FormatError(f"annotation {key}={value!r}: negative number")
    return nums


def decompress_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Decompress a zstd stream (across frames), refusing more than ``limit`` bytes."""
    pieces: list[bytes] = []
    done = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        while True:
            got = reader.read(limit + 1 - done)
            if not got:
                break
            pieces.append(got)
            done += len(got)
            if done > limit:
                raise FormatError(f"{what} exceeds the limit of {limit} bytes")
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what} is not valid zstd: {exc}") from exc
    # One piece in practice: no second copy of a large manifest.
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


# Uncompressed bytes skipped before a chunk are decompressed and dropped in pieces this
# large.
SKIP_PIECE = 1 << 20


def unzstd_chunk(compressed: bytes, skip: int, size: int) -> bytes:
    """Decompress zstd frames from the start of ``compressed``; skip ``skip``, return ``size``.

    Crosses frame boundaries (and skippable frames) and stops after enough bytes, so a
    range that also holds the next tar header or the manifest is fine.  Bounded whatever
    the frames decompress to: the decoder is never asked for more than ``size`` bytes of
    the chunk, and the skipped bytes are dropped in pieces of at most ``SKIP_PIECE``.
    """
    want = skip + size
    done = 0
    pieces: list[bytes] = []
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
        while done < want:
            limit = min(skip - done, SKIP_PIECE) if done < skip else want - done
            got = reader.read(limit)
            if not got:
                raise IntegrityError(f"compressed range ends after {done} of {want} bytes")
            if done >= skip:
                pieces.append(got)
            done += len(got)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"corrupt zstd data: {exc}") from exc
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
