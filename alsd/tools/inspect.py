"""``alsd inspect FILE [--annotations JSON]``: describe one layer blob as a JSON object.

The FILE form reads a blob from disk and runs the pure format readers over it; the REF
form (an image in a registry) is dispatched to :func:`inspect_ref`.  Exit status: 0 for a
readable layer (lazily pullable or not), 1 with a one-line error on stderr for a corrupt
one, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from collections.abc import Mapping
from typing import Any

from alsd.errors import AlsdError, FormatError, NotLazyError
from alsd.oci import formats

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"alsd {cmd}", description="inspect a layer blob")
    p.add_argument("target", metavar="FILE|REF", help="a layer blob file or an image reference")
    p.add_argument(
        "--annotations",
        metavar="JSON",
        help="the layer descriptor's annotations as a JSON object, to verify the TOC",
    )
    p.add_argument("--media-type", help="the layer descriptor's media type")
    p.add_argument(
        "--max-toc-bytes",
        type=int,
        default=formats.DEFAULT_MAX_TOC_BYTES,
        help="largest uncompressed TOC accepted (default %(default)s)",
    )
    return p


def main(cmd: str, argv: list[str]) -> int:
    args = _parser(cmd).parse_args(argv)
    annotations: dict[str, str] = {}
    if args.annotations is not None:
        try:
            parsed = json.loads(args.annotations)
        except ValueError as exc:
            print(f"alsd {cmd}: --annotations is not JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
        ):
            print(f"alsd {cmd}: --annotations must be an object of strings", file=sys.stderr)
            return 2
        annotations = parsed
    if os.path.isfile(args.target):
        return inspect_file(args.target, annotations, args.media_type, args.max_toc_bytes)
    return inspect_ref(args.target, annotations)


def inspect_ref(ref: str, annotations: Mapping[str, str]) -> int:
    """The REF form (an image in a registry): see :mod:`alsd.tools.inspect_ref`."""
    from alsd.tools.inspect_ref import run  # lazily: the FILE form needs no aiohttp

    return run(ref)


def describe_blob(
    blob: bytes,
    annotations: Mapping[str, str],
    media_type: str | None = None,
    *,
    max_toc_bytes: int = formats.DEFAULT_MAX_TOC_BYTES,
) -> dict[str, Any]:
    """The JSON object ``inspect`` prints; raises AlsdError for a corrupt blob."""
    try:
        loc = formats.detect(blob[-formats.TAIL_SIZE :], len(blob), annotations, media_type)
    except NotLazyError:
        return _not_lazy()
    except FormatError:
        # No footer and no media type: an intact plain layer is readable, just not lazy.
        if media_type is None and _is_plain_layer(blob):
            return _not_lazy()
        raise
    # Past detection, any error means a corrupt lazy layer (never "not lazy").
    index = formats.parse_toc(
        loc,
        blob[loc.offset : loc.offset + loc.length],
        len(blob),
        annotations,
        max_toc_bytes=max_toc_bytes,
    )
    # The whole blob is at hand, so check every chunk too: a corrupt payload is corruption.
    for node, chunk in index.iter_chunks():
        compressed = blob[chunk.blob_offset : chunk.fetch_end]
        formats.decode_chunk(index.format, chunk, compressed, path=index.path(node))
    return {
        "format": str(index.format),
        "toc_digest": index.toc_digest,
        "verified": index.verified,
        "entries": index.entry_count,
        "regular_files": index.regular_file_count(),
        "chunks": index.chunk_count(),
        "prefetch": index.prefetch,
        "prioritized_bytes": index.prefetch_end if index.prefetch == "landmark" else 0,
    }


def _not_lazy() -> dict[str, Any]:
    return {
        "format": None,
        "toc_digest": None,
        "verified": False,
        "entries": None,
        "regular_files": None,
        "chunks": None,
        "prefetch": None,
        "prioritized_bytes": 0,
    }


def _is_plain_layer(blob: bytes) -> bool:
    """A plain tar, tar+gzip or tar+zstd layer whose stream really is intact."""
    try:
        if blob.startswith(_GZIP_MAGIC):
            head = _gunzip_all_head(blob)
        elif blob.startswith(_ZSTD_MAGIC):
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
            head = reader.read(512)
            while reader.read(1 << 20):  # walk the whole stream: truncation raises
                pass
        else:
            head = blob[:512]
    except Exception:  # any decoder complaint means "not an intact plain layer"
        return False
    return head is not None and len(head) == 512 and head[257:262] == b"ustar"


def _gunzip_all_head(blob: bytes) -> bytes | None:
    """First 512 bytes of a multi-member gzip, or None if the stream is truncated."""
    head = b""
    data = blob
    while data:
        d = zlib.decompressobj(31)
        while True:
            out = d.decompress(data, 1 << 20)
            if len(head) < 512:
                head += out[: 512 - len(head)]
            if d.eof:
                data = d.unused_data
                break
            data = d.unconsumed_tail
            if not data and not out:
                return None
    return head


def inspect_file(
    path: str, annotations: Mapping[str, str], media_type: str | None, max_toc_bytes: int
) -> int:
    try:
        with open(path, "rb") as f:
            blob = f.read()
        result = describe_blob(blob, annotations, media_type, max_toc_bytes=max_toc_bytes)
    except (AlsdError, OSError) as exc:
        print(f"alsd inspect: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0
