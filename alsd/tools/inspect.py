"""``alsd inspect [--json] FILE|REF``: can this layer blob, or every layer of this image,
be pulled lazily, and if not, why.

The FILE form reads a blob from disk and runs the pure format readers over it; the REF
form (an image in a registry) is dispatched to :mod:`alsd.inspect_ref`. Text for a
person by default, one JSON object with ``--json``. Exit status (alsd(8)): 0 lazily
pullable; 1 not lazily pullable, corrupt or unreadable, with the reason on stderr; 2 a
usage or configuration error (a FILE that does not exist, ``--annotations`` with a REF,
a bad alsd.toml or registries.conf).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from collections.abc import Mapping
from typing import Any

from alsd.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    AlsdError,
    ConfigError,
    FormatError,
    InvalidReference,
    NotLazyError,
)
from alsd.oci import formats
from alsd.tools.text import (
    GZIP_MAGIC,
    NOT_LAZY_HINT,
    ZSTD_MAGIC,
    human_bytes,
    not_lazy_reason,
)


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"alsd {cmd}",
        description="Say whether a layer blob (FILE) or every layer of an image in a "
        "registry (REF) can be pulled lazily, and if not, why. Exit status 0: lazily "
        "pullable; 1: not, or it cannot be read; 2: usage or configuration error.",
    )
    p.add_argument(
        "target",
        metavar="FILE|REF",
        help="a layer blob file, or an image reference such as registry.example/app:1.0",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="alsd.toml to take [registry] registries_conf and auth_file from "
        "(default /etc/alsd.toml)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    p.add_argument(
        "--annotations",
        metavar="JSON",
        help="FILE only: the layer descriptor's annotations as a JSON object, to verify "
        "the TOC digest",
    )
    p.add_argument("--media-type", metavar="TYPE", help="FILE only: the layer's media type")
    p.add_argument(
        "--max-toc-bytes",
        type=int,
        default=formats.DEFAULT_MAX_TOC_BYTES,
        metavar="N",
        help="largest uncompressed TOC accepted (default %(default)s)",
    )
    return p


def _looks_like_path(text: str) -> bool:
    """An argument no image reference can be: it was meant as a file."""
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..")


def main(cmd: str, argv: list[str]) -> int:
    args = _parser(cmd).parse_args(argv)

    def usage(msg: str) -> int:
        print(f"alsd {cmd}: {msg}", file=sys.stderr)
        return EXIT_USAGE

    if args.max_toc_bytes <= 0:
        return usage("--max-toc-bytes must be a number of bytes greater than 0")
    target: str = args.target
    if os.path.isdir(target):
        return usage(f"{target}: is a directory; give a layer blob file or an image reference")
    is_file = os.path.exists(target)
    if not is_file and _looks_like_path(target):
        return usage(
            f"{target}: no such file (give an existing layer blob file, or an image "
            "reference such as registry.example/app:1.0)"
        )
    cfg = None
    if args.config is not None or not is_file:
        from alsd import config

        try:
            cfg = config.load(args.config)
        except ConfigError as exc:
            return usage(str(exc))
    if not is_file:
        from alsd.oci.reference import parse_reference

        try:
            parse_reference(target)
        except InvalidReference as exc:
            return usage(f"{target}: no such file, and not an image reference: {exc}")
        for flag, value in (("--annotations", args.annotations), ("--media-type", args.media_type)):
            if value is not None:
                return usage(
                    f"{flag} applies to a blob FILE only: for an image REF alsd takes each "
                    "layer's annotations and media type from the image's manifest"
                )
        return inspect_ref(target, cfg, json_output=args.json, max_toc_bytes=args.max_toc_bytes)
    annotations: dict[str, str] = {}
    if args.annotations is not None:
        try:
            parsed = json.loads(args.annotations)
        except ValueError as exc:
            return usage(f"--annotations is not JSON: {exc}")
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
        ):
            return usage('--annotations must be a JSON object of strings, {"key": "value"}')
        annotations = parsed
    return inspect_file(
        target, annotations, args.media_type, args.max_toc_bytes, json_output=args.json
    )


def inspect_ref(ref: str, cfg: Any, *, json_output: bool, max_toc_bytes: int) -> int:
    """The REF form (an image in a registry): see :mod:`alsd.tools.inspect_ref`."""
    from alsd.tools.inspect_ref import run  # lazily: the FILE form needs no aiohttp

    return run(ref, cfg, json_output=json_output, max_toc_bytes=max_toc_bytes)


def describe_blob(
    blob: bytes,
    annotations: Mapping[str, str],
    media_type: str | None = None,
    *,
    max_toc_bytes: int = formats.DEFAULT_MAX_TOC_BYTES,
) -> dict[str, Any]:
    """The JSON object ``inspect --json`` prints; raises AlsdError for a corrupt blob."""
    try:
        loc = formats.detect(blob[-formats.TAIL_SIZE :], len(blob), annotations, media_type)
    except NotLazyError as exc:
        return not_lazy(not_lazy_reason(exc, media_type, blob[:4]))
    except FormatError as exc:
        # No footer and no media type: an intact plain layer is readable, just not lazy.
        if media_type is None and _is_plain_layer(blob):
            return not_lazy(not_lazy_reason(exc, media_type, blob[:4]))
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
        "lazy": True,
        "reason": None,
        "format": str(index.format),
        "toc_digest": index.toc_digest,
        "verified": index.verified,
        "entries": index.entry_count,
        "regular_files": index.regular_file_count(),
        "chunks": index.chunk_count(),
        "prefetch": index.prefetch,
        "prioritized_bytes": index.prefetch_end if index.prefetch == "landmark" else 0,
    }


def not_lazy(reason: str) -> dict[str, Any]:
    """The object of a layer that is valid but not lazily pullable."""
    return {
        "lazy": False,
        "reason": reason,
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
        if blob.startswith(GZIP_MAGIC):
            head = _gunzip_all_head(blob)
        elif blob.startswith(ZSTD_MAGIC):
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


def format_blob(path: str, d: Mapping[str, Any]) -> str:
    """The text ``alsd inspect FILE`` prints for a lazily pullable blob."""
    if d["verified"]:
        toc = f"{d['toc_digest']} (verified against the annotation)"
    else:
        toc = f"{d['toc_digest']} (not verified: give --annotations to check it)"
    if d["prefetch"] == "landmark":
        prio = f"the first {human_bytes(d['prioritized_bytes'])} (files before the landmark)"
    elif d["prefetch"] == "none":
        prio = "none (the image marks no files to fetch first)"
    else:
        prio = "none (not an optimised image; see alsd convert --prioritize)"
    return "\n".join(
        [
            f"{path}: lazily pullable, {d['format']}",
            f"  TOC digest   {toc}",
            f"  content      {d['entries']} entries, {d['regular_files']} regular files in "
            f"{d['chunks']} chunks",
            f"  prioritised  {prio}",
        ]
    )


def inspect_file(
    path: str,
    annotations: Mapping[str, str],
    media_type: str | None,
    max_toc_bytes: int,
    *,
    json_output: bool = False,
) -> int:
    try:
        with open(path, "rb") as f:
            blob = f.read()
        result = describe_blob(blob, annotations, media_type, max_toc_bytes=max_toc_bytes)
    except (AlsdError, OSError) as exc:
        print(f"alsd inspect: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if json_output:
        print(json.dumps(result, sort_keys=True))
    if not result["lazy"]:
        print(
            f"alsd inspect: {path}: not lazily pullable: {result['reason']}; {NOT_LAZY_HINT}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if not json_output:
        print(format_blob(path, result))
    return EXIT_OK
