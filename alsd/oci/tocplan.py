"""The tail -> footer -> TOC fetch plan of a lazily pullable layer, shared by the layer
resolver and ``alsd inspect REF``.

A layer's TOC is found by reading the blob's last :data:`~alsd.oci.formats.TAIL_SIZE`
bytes (its footer, see developer-notes/protocol.md), which say where the TOC (and, for
zstd:chunked, the tar-split) lies; the TOC is then read with one more range request,
unless it already came with the tail (small layers). ``max_toc_bytes`` is checked before
the TOC is fetched: a layer announcing a huge TOC costs one small request, not the TOC.

No I/O of its own: :func:`read_layer_index` is handed the function that reads byte ranges
of the blob (the registry client's, wrapped by the caller). Parsing runs in a worker
thread (a TOC of tens of MiB takes a while to parse).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from alsd.errors import FormatError
from alsd.oci import formats
from alsd.oci.layer_index import LayerIndex

RangeRead = Callable[[Sequence[tuple[int, int]]], Awaitable[list[bytes]]]


@dataclass(frozen=True, slots=True)
class LayerToc:
    index: LayerIndex
    uncompressed_size: int | None  # from the annotation or the tar-split, if known


def tail_range(blob_size: int) -> tuple[int, int]:
    """The byte range of the blob's tail that :func:`formats.detect` wants."""
    return (max(0, blob_size - formats.TAIL_SIZE), blob_size)


async def read_layer_index(
    read: RangeRead,
    *,
    name: str,
    blob_size: int,
    annotations: Mapping[str, str],
    media_type: str | None,
    max_toc_bytes: int,
    max_chunk_bytes: int = formats.DEFAULT_MAX_CHUNK_BYTES,
    want_uncompressed_size: bool = True,
) -> LayerToc:
    """Read and parse the TOC of a blob of ``blob_size`` bytes through ``read``.

    ``name`` is for messages. With ``want_uncompressed_size``, a zstd:chunked layer
    without the uncompressed-size annotation also has its tar-split read (in the same
    request as the TOC) to compute it. Raises NotLazyError (not a lazily pullable
    layer), FormatError, IntegrityError, or whatever ``read`` raises.
    """
    if blob_size <= 0:
        raise FormatError(f"{name}: descriptor size {blob_size}")
    tail_start, _ = tail_range(blob_size)
    (tail,) = await read([(tail_start, blob_size)])
    loc = formats.detect(tail, blob_size, annotations, media_type)
    if loc.length > max_toc_bytes:
        raise FormatError(f"{name}: TOC of {loc.length} bytes exceeds max_toc_bytes")
    unc = formats.uncompressed_size_from_annotations(annotations)
    ranges: list[tuple[int, int]] = []
    toc_range = (loc.offset, loc.offset + loc.length)
    toc_bytes: bytes | None = None
    if toc_range[0] >= tail_start and toc_range[1] <= blob_size:
        # Small layers: the TOC already came with the tail.
        toc_bytes = tail[toc_range[0] - tail_start : toc_range[1] - tail_start]
    else:
        ranges.append(toc_range)
    want_tarsplit = want_uncompressed_size and unc is None and loc.tarsplit is not None
    if want_tarsplit:
        assert loc.tarsplit is not None
        ts_off, ts_len = loc.tarsplit
        if ts_len > max_toc_bytes:
            want_tarsplit = False
        else:
            ranges.append((ts_off, ts_off + ts_len))
    bodies = await read(ranges) if ranges else []
    toc = toc_bytes if toc_bytes is not None else bodies.pop(0)
    index = await asyncio.to_thread(
        partial(
            formats.parse_toc, loc, toc, blob_size, annotations,
            max_toc_bytes=max_toc_bytes, max_chunk_bytes=max_chunk_bytes,
        )
    )  # fmt: skip
    if want_tarsplit:
        unc = await asyncio.to_thread(formats.tarsplit_uncompressed_size, bodies.pop(0))
    return LayerToc(index, unc)
