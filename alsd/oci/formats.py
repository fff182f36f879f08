"""Format detection, TOC parsing and chunk decoding for every lazily pullable layer format.

Pure functions (bytes in, frozen values out; no I/O, no asyncio).  The caller fetches
``TAIL_SIZE`` bytes from the end of the blob, calls :func:`detect`, fetches the TOC range it
names, calls :func:`parse_toc` to get a :class:`~alsd.oci.layer_index.LayerIndex`, and for
every chunk fetches ``[blob_offset, fetch_end)`` and calls :func:`decode_chunk`.

Supported (spec.md sections 3 and 4):

* eStargz (51-byte gzip footer) and legacy stargz (47-byte footer);
* zstd:chunked by containers/storage, 2020 layout (40-byte footer, "GnUlInUx",
  ``io.containers.zstd-chunked.*``) and current layout (64-byte footer, "GNUlInUx",
  ``io.github.containers.zstd-chunked.*``, tar-split);
* stargz-snapshotter's zstd:chunked (eStargz rules over zstd frames).

TOC digests: eStargz, stargz and stargz-snapshotter's zstd:chunked hash the *uncompressed*
TOC JSON; containers/storage hashes the *compressed* manifest.  Every annotation that
applies is checked; a mismatch raises :class:`~alsd.errors.IntegrityError` (not
FormatError: the TOC parsed fine, it is just not the one the manifest promised, which is
the same failure family as a chunk digest mismatch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alsd.errors import FormatError, IntegrityError, PlainLayer
from alsd.oci import annotations as keys
from alsd.oci import estargz, toc_json, zstdchunked
from alsd.oci.index_builder import IndexBuilder
from alsd.oci.layer_index import Chunk, EntryKind, LayerFormat, LayerIndex
from alsd.oci.tarsplit import tarsplit_uncompressed_size as _tarsplit_size

__all__ = [
    "ANN_CSTORAGE_CHECKSUM",
    "ANN_CSTORAGE_OLD_CHECKSUM",
    "ANN_CSTORAGE_OLD_POSITION",
    "ANN_CSTORAGE_POSITION",
    "ANN_CSTORAGE_TARSPLIT_POSITION",
    "ANN_STARGZ_TOC_DIGEST",
    "ANN_UNCOMPRESSED_SIZE",
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEFAULT_MAX_TOC_BYTES",
    "TAIL_SIZE",
    "Chunk",
    "EntryKind",
    "LayerFormat",
    "LayerIndex",
    "TocLocation",
    "ZstdProducer",
    "decode_chunk",
    "detect",
    "index_blob",
    "parse_toc",
    "tarsplit_uncompressed_size",
    "uncompressed_size_from_annotations",
]

ANN_STARGZ_TOC_DIGEST = keys.STARGZ_TOC_DIGEST
ANN_UNCOMPRESSED_SIZE = keys.UNCOMPRESSED_SIZE
ANN_CSTORAGE_CHECKSUM = keys.ZSTD_CHUNKED_CHECKSUM
ANN_CSTORAGE_POSITION = keys.ZSTD_CHUNKED_POSITION
ANN_CSTORAGE_TARSPLIT_POSITION = keys.ZSTD_CHUNKED_TARSPLIT_POSITION
ANN_CSTORAGE_OLD_CHECKSUM = keys.ZSTD_CHUNKED_OLD_CHECKSUM
ANN_CSTORAGE_OLD_POSITION = keys.ZSTD_CHUNKED_OLD_POSITION

# The longest footer is c/storage's current one: 8-byte skippable header + 64 bytes.
TAIL_SIZE = zstdchunked.SKIPPABLE_HEADER_SIZE + zstdchunked.FOOTER_NEW_SIZE
DEFAULT_MAX_TOC_BYTES = 64 << 20
# The largest uncompressed chunk a TOC may declare (inner offset + size; "zeros" chunks
# exempt).  What real producers emit, and why 64 MiB: developer-notes/limits.md.
DEFAULT_MAX_CHUNK_BYTES = 64 << 20

_PLAIN_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)


class ZstdProducer:
    """Who wrote a zstd:chunked blob; decides TOC digest semantics and chunk ranges."""

    CSTORAGE = "containers-storage"
    STARGZ = "stargz-snapshotter"
    UNKNOWN = "unknown"  # 40-byte footer, no telling annotation: decided from the TOC


@dataclass(frozen=True)
class TocLocation:
    format: LayerFormat
    offset: int  # compressed TOC bytes to fetch: [offset, offset+length)
    length: int
    tarsplit: tuple[int, int] | None  # (offset, length) of zstd:chunked tar-split, if any
    payload_end: int  # file payloads lie in [0, payload_end)
    uncompressed_length: int | None = None  # zstd:chunked manifest, when known
    producer: str | None = None  # ZstdProducer value for zstd:chunked, else None
    tarsplit_uncompressed: int | None = None


def _check_range(what: str, offset: int, length: int, limit: int) -> None:
    if offset < 0 or length <= 0 or offset + length > limit:
        raise FormatError(
            f"{what} [{offset}, {offset + length}) lies outside the blob of {limit} bytes"
        )


def detect(
    tail: bytes,
    blob_size: int,
    annotations: Mapping[str, str],
    media_type: str | None = None,
) -> TocLocation:
    """Find the TOC of a blob from its last bytes (at least ``TAIL_SIZE`` of them, or all).

    zstd:chunked manifest-position annotations are authoritative (as in containers/storage)
    and win over the footer.  Raises NotLazyError for a plain layer (known layer media type
    and no footer), FormatError for anything unrecognised.
    """
    if len(tail) > blob_size:
        raise FormatError(f"tail of {len(tail)} bytes is longer than the blob ({blob_size})")
    pos_key = next(
        (k for k in (ANN_CSTORAGE_POSITION, ANN_CSTORAGE_OLD_POSITION) if k in annotations), None
    )
    if pos_key is not None:
        off, clen, ulen, mtype = zstdchunked.parse_position(annotations[pos_key], 4, pos_key)
        if mtype != zstdchunked.MANIFEST_TYPE_CRFS:
            raise FormatError(f"annotation {pos_key}: unsupported manifest type {mtype}")
        tarsplit = None
        ts_ulen = None
        if ANN_CSTORAGE_TARSPLIT_POSITION in annotations:
            t_off, t_len, ts_ulen = zstdchunked.parse_position(
                annotations[ANN_CSTORAGE_TARSPLIT_POSITION], 3, ANN_CSTORAGE_TARSPLIT_POSITION
            )
            _check_range("tar-split", t_off, t_len, blob_size)
            tarsplit = (t_off, t_len)
        if ANN_STARGZ_TOC_DIGEST in annotations:
            producer = ZstdProducer.STARGZ
        elif pos_key == ANN_CSTORAGE_POSITION:
            producer = ZstdProducer.CSTORAGE
        else:
            producer = ZstdProducer.UNKNOWN
        return _zstd_location(off, clen, ulen, tarsplit, ts_ulen, producer, blob_size)

    zf = zstdchunked.parse_footer(tail)
    if zf is not None:
        if zf.manifest_type != zstdchunked.MANIFEST_TYPE_CRFS:
            raise FormatError(f"zstd:chunked footer: unsupported manifest type {zf.manifest_type}")
        tarsplit = ts_ulen = None
        if zf.tarsplit is not None:
            _check_range("tar-split", zf.tarsplit[0], zf.tarsplit[1], blob_size - zf.size)
            tarsplit, ts_ulen = (zf.tarsplit[0], zf.tarsplit[1]), zf.tarsplit[2]
        if zf.new_layout:
            producer = ZstdProducer.CSTORAGE
        elif ANN_STARGZ_TOC_DIGEST in annotations:
            producer = ZstdProducer.STARGZ
        else:
            producer = ZstdProducer.UNKNOWN
        return _zstd_location(
            zf.manifest_offset,
            zf.manifest_length,
            zf.manifest_uncompressed,
            tarsplit,
            ts_ulen,
            producer,
            blob_size - zf.size,
        )

    gf = estargz.parse_footer(tail)
    if gf is not None:
        toc_end = blob_size - gf.size
        _check_range("TOC", gf.toc_offset, toc_end - gf.toc_offset, toc_end)
        return TocLocation(
            format=LayerFormat.STARGZ if gf.legacy else LayerFormat.ESTARGZ,
            offset=gf.toc_offset,
            length=toc_end - gf.toc_offset,
            tarsplit=None,
            payload_end=gf.toc_offset,
        )
    if media_type is not None and media_type in _PLAIN_MEDIA_TYPES:
        raise PlainLayer(f"layer of type {media_type} has no eStargz/zstd:chunked footer")
    raise FormatError("unknown footer: not an eStargz, stargz or zstd:chunked blob")


def _zstd_location(
    off: int,
    clen: int,
    ulen: int,
    tarsplit: tuple[int, int] | None,
    ts_ulen: int | None,
    producer: str,
    limit: int,
) -> TocLocation:
    if off < zstdchunked.SKIPPABLE_HEADER_SIZE:
        raise FormatError(f"zstd:chunked manifest offset {off} is inside the skippable header")
    _check_range("zstd:chunked manifest", off, clen, limit)
    return TocLocation(
        format=LayerFormat.ZSTD_CHUNKED,
        offset=off,
        length=clen,
        tarsplit=tarsplit,
        payload_end=off - zstdchunked.SKIPPABLE_HEADER_SIZE,
        uncompressed_length=ulen,
        producer=producer,
        tarsplit_uncompressed=ts_ulen,
    )


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _verify(annotations: Mapping[str, str], key: str, actual: str, checked: list[str]) -> None:
    expected = annotations.get(key)
    if expected is None:
        return
    if expected != actual:
        raise IntegrityError(
            f"TOC digest mismatch: {key} is {expected}, the TOC hashes to {actual}"
        )
    checked.append(key)


def parse_toc(
    loc: TocLocation,
    toc_bytes: bytes,
    blob_size: int,
    annotations: Mapping[str, str],
    *,
    max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> LayerIndex:
    """Decode and verify the TOC (``toc_bytes`` = blob[loc.offset : loc.offset+loc.length]).

    Raises FormatError for truncated, oversized or malformed TOCs (a chunk larger than
    ``max_chunk_bytes`` included) and IntegrityError when a TOC digest annotation does not
    match.
    """
    if len(toc_bytes) != loc.length:
        raise FormatError(f"TOC truncated: got {len(toc_bytes)} of {loc.length} bytes")
    checked: list[str] = []
    if loc.format in (LayerFormat.ESTARGZ, LayerFormat.STARGZ):
        raw = estargz.extract_toc(toc_bytes, max_toc_bytes)
        own = _sha256(raw)
        _verify(annotations, ANN_STARGZ_TOC_DIGEST, own, checked)
        toc_digest = own
    else:
        ulen = loc.uncompressed_length
        if ulen is not None and ulen > max_toc_bytes:
            raise FormatError(f"TOC of {ulen} bytes exceeds the limit of {max_toc_bytes}")
        raw = zstdchunked.decompress_bounded(toc_bytes, max_toc_bytes, "zstd:chunked manifest")
        if ulen is not None and len(raw) != ulen:
            raise FormatError(f"TOC truncated: manifest is {len(raw)} bytes, expected {ulen}")
        compressed_digest = _sha256(toc_bytes)
        uncompressed_digest = _sha256(raw)
        _verify(annotations, ANN_STARGZ_TOC_DIGEST, uncompressed_digest, checked)
        _verify(annotations, ANN_CSTORAGE_CHECKSUM, compressed_digest, checked)
        _verify(annotations, ANN_CSTORAGE_OLD_CHECKSUM, compressed_digest, checked)
    # Read the entries one at a time into the builder (toc_json.py: the peak is then the
    # text plus the index, not a dict per entry); the bytes are not needed any more.
    starts_indented = raw.startswith(b"{\n\t")
    text = toc_json.decode_text(raw)
    del raw
    builder = IndexBuilder(loc.payload_end, max_chunk_bytes)
    has_end_offset = False

    def on_entry(e: Any) -> None:
        nonlocal has_end_offset
        if not has_end_offset and isinstance(e, dict) and "endOffset" in e:
            has_end_offset = True
        builder.add(e)

    def on_member(key: str, value: Any) -> None:
        if key == "version":  # producers write it first: refuse before building
            _check_version(value)

    toc = toc_json.scan_toc(text, on_entry, on_member)
    del text
    _check_version(toc.get("version"))
    if toc.get("entries") is not None:
        raise FormatError("TOC: 'entries' is not a list")
    if loc.format == LayerFormat.ZSTD_CHUNKED:
        producer = loc.producer or ZstdProducer.UNKNOWN
        if producer == ZstdProducer.UNKNOWN:
            producer = _guess_producer(has_end_offset, starts_indented)
        # What containers/image's GetTOCDigest picks, else the producer's own definition.
        if ANN_STARGZ_TOC_DIGEST in annotations:
            toc_digest = uncompressed_digest
        elif ANN_CSTORAGE_CHECKSUM in annotations:
            toc_digest = compressed_digest
        elif producer == ZstdProducer.STARGZ:
            toc_digest = uncompressed_digest
        else:
            toc_digest = compressed_digest
    return builder.finish(
        format=loc.format, toc_digest=toc_digest, verified=bool(checked), blob_size=blob_size
    )


def _check_version(version: Any) -> None:
    if version != 1:
        raise FormatError(f"TOC version {version!r} is not supported")


def _guess_producer(has_end_offset: bool, starts_indented: bool) -> str:
    # c/storage always records endOffset for files with content and writes compact JSON;
    # stargz-snapshotter writes json.MarshalIndent output and never endOffset.
    if has_end_offset:
        return ZstdProducer.CSTORAGE
    if starts_indented:
        return ZstdProducer.STARGZ
    return ZstdProducer.CSTORAGE


def decode_chunk(
    index_format: LayerFormat, chunk: Chunk, compressed: bytes, *, path: str = ""
) -> bytes:
    """Decompress one chunk from ``compressed`` = blob[chunk.blob_offset : chunk.fetch_end]
    and verify it; IntegrityError (naming the file and offset) on any mismatch."""
    where = f"{path or '<file>'} at offset {chunk.file_offset}"
    if chunk.zeros:
        data = bytes(chunk.size)
    else:
        try:
            if index_format == LayerFormat.ZSTD_CHUNKED:
                data = zstdchunked.unzstd_chunk(compressed, chunk.inner_offset, chunk.size)
            else:
                data = estargz.gunzip_chunk(compressed, chunk.inner_offset, chunk.size)
        except IntegrityError as exc:
            raise IntegrityError(f"{where}: {exc}") from exc
    actual = _sha256(data)
    if actual != chunk.digest:
        raise IntegrityError(f"{where}: chunk digest {actual} != expected {chunk.digest}")
    return data


def uncompressed_size_from_annotations(annotations: Mapping[str, str]) -> int | None:
    """The uncompressed tar size a converter recorded, or None when absent or unusable."""
    value = annotations.get(ANN_UNCOMPRESSED_SIZE)
    if value is None or not value.isdigit():
        return None
    return int(value)


def tarsplit_uncompressed_size(tarsplit_compressed: bytes) -> int:
    """Uncompressed tar size of a current zstd:chunked layer, from its tar-split."""
    return _tarsplit_size(tarsplit_compressed)


def index_blob(
    blob: bytes,
    annotations: Mapping[str, str],
    media_type: str | None = None,
    *,
    max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> LayerIndex:
    """Convenience for a blob held in memory (``alsd inspect FILE``, tests)."""
    loc = detect(blob[-TAIL_SIZE:], len(blob), annotations, media_type)
    return parse_toc(
        loc,
        blob[loc.offset : loc.offset + loc.length],
        len(blob),
        annotations,
        max_toc_bytes=max_toc_bytes,
        max_chunk_bytes=max_chunk_bytes,
    )
