"""Hostile layers cannot make the reader allocate what they declare.

Chunk bombs (a member of zeros compressed ~1000:1 behind a TOC that declares any size):
refused when the TOC is parsed if the declared size is above ``max_chunk_bytes``, and
below it never inflated past the declared size.  A TOC's parse has a bounded peak too.
Memory is measured, not assumed: ``tracemalloc`` for the decoders (every bytes object
zlib and zstandard return is traced), a child process's peak RSS for the TOC parse
(``VmHWM``, not ``ru_maxrss``, which keeps the parent's peak across exec).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import zstandard

from alsd.errors import FormatError, IntegrityError
from alsd.oci import formats
from alsd.oci.layer_index import Chunk, LayerFormat
from tests.support.hostile import HostileBlob, gzip_zeros, sha, zeros_digest, zstd_zeros

MiB = 1 << 20
BOMB = 384 * MiB  # what the bomb's member inflates to (the case)
FORMATS = ["estargz", "zstd"]
T = TypeVar("T")


def peak_of(fn: Callable[[], T]) -> tuple[T | BaseException, int]:
    """(result or exception, peak traced bytes while ``fn`` ran)."""
    tracemalloc.start()
    try:
        result: T | BaseException = fn()
    except Exception as exc:
        result = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, peak


def bomb_chunk(blob: bytes, fmt: str, name: str = "bomb") -> tuple[LayerFormat, Chunk]:
    index = formats.index_blob(blob, {})
    node = index.find(name)
    assert node is not None
    (chunk,) = index.chunks(node)
    return index.format, chunk


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_chunk_declared_above_the_ceiling_refuses_the_layer_at_parse(fmt: str) -> None:
    b = HostileBlob(fmt)  # type: ignore[arg-type]
    b.file("ok.txt", b"fine\n")
    b.bomb("data/bomb", declared=1 << 40, inflated=BOMB)
    blob, _ = b.finish()
    with pytest.raises(FormatError) as e:
        formats.index_blob(blob, {})
    msg = str(e.value)
    assert "data/bomb" in msg and str(1 << 40) in msg and "max_chunk_bytes" in msg, msg
    # The ceiling is a setting: raised above the declared size, the same TOC parses.
    index = formats.index_blob(blob, {}, max_chunk_bytes=2 << 40)
    assert index.find("data/bomb") is not None


def test_the_ceiling_counts_the_bytes_inflated_before_the_chunk() -> None:
    """A chunk deep inside a shared member (innerOffset) costs its offset too."""
    b = HostileBlob("estargz")
    b.bomb("bomb", declared=MiB, inflated=MiB)
    b.entries[-1]["innerOffset"] = formats.DEFAULT_MAX_CHUNK_BYTES
    blob, _ = b.finish()
    with pytest.raises(FormatError, match="inner offset"):
        formats.index_blob(blob, {})


def test_zeros_chunks_need_no_ceiling() -> None:
    """A zstd:chunked "zeros" chunk (a hole) is neither fetched nor inflated: a huge one
    (sparse files have them) parses, and decoding it needs no compressed bytes."""
    b = HostileBlob("zstd")
    b.file("ok.txt", b"fine\n")
    b.entries.append(
        {
            "name": "sparse", "type": "reg", "mode": 0o644, "size": 1 << 40,
            "offset": 0, "chunkSize": 1 << 40, "chunkType": "zeros",
            "chunkDigest": sha(b"anything"), "digest": sha(b"anything"),
        }
    )  # fmt: skip
    blob, _ = b.finish()
    index = formats.index_blob(blob, {})
    node = index.find("sparse")
    assert node is not None
    (chunk,) = index.chunks(node)
    assert chunk.zeros and chunk.size == 1 << 40


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_member_inflating_past_its_declared_size_is_refused_in_bounded_memory(
    fmt: str,
) -> None:
    declared = 48 * MiB  # under the ceiling
    b = HostileBlob(fmt)  # type: ignore[arg-type]
    b.bomb("bomb", declared=declared, inflated=BOMB, digest=sha(b"what it claims"))
    blob, _ = b.finish()
    index_format, chunk = bomb_chunk(blob, fmt)
    comp = blob[chunk.blob_offset : chunk.fetch_end]
    result, peak = peak_of(lambda: formats.decode_chunk(index_format, chunk, comp, path="bomb"))
    assert isinstance(result, IntegrityError), result
    assert "bomb" in str(result)
    # At most the declared size twice (zlib joins its output blocks) plus small slack;
    # the bomb's 384 MiB are never inflated.
    assert peak < 2 * declared + 4 * MiB, f"peak {peak / MiB:.0f} MiB"


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoding_stops_at_the_declared_size(fmt: str) -> None:
    """Honest digest, member longer than the chunk: the chunk's bytes, nothing more."""
    declared = 16 * MiB
    b = HostileBlob(fmt)  # type: ignore[arg-type]
    b.bomb("bomb", declared=declared, inflated=BOMB)
    blob, _ = b.finish()
    index_format, chunk = bomb_chunk(blob, fmt)
    comp = blob[chunk.blob_offset : chunk.fetch_end]
    result, peak = peak_of(lambda: formats.decode_chunk(index_format, chunk, comp))
    assert isinstance(result, bytes) and len(result) == declared
    assert formats.decode_chunk(index_format, chunk, comp) == bytes(declared)
    assert peak < 2 * declared + 4 * MiB, f"peak {peak / MiB:.0f} MiB"


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_skipped_before_a_chunk_are_dropped_in_pieces(fmt: str) -> None:
    """innerOffset 60 MiB into a bomb: the 60 MiB are inflated and dropped piece by piece."""
    comp = gzip_zeros(BOMB) if fmt == "estargz" else zstd_zeros(BOMB)
    skip, size = 60 * MiB, MiB
    chunk = Chunk(
        file_offset=0, size=size, blob_offset=0, inner_offset=skip, fetch_end=len(comp),
        digest=zeros_digest(size),
    )  # fmt: skip
    index_format = LayerFormat.ESTARGZ if fmt == "estargz" else LayerFormat.ZSTD_CHUNKED
    result, peak = peak_of(lambda: formats.decode_chunk(index_format, chunk, comp))
    assert result == bytes(size)
    assert peak < 8 * MiB, f"peak {peak / MiB:.0f} MiB"


# -- the TOC parse's peak ---------------------------------------------------------------

_CHILD = """
import sys
from alsd.oci import formats
from alsd.oci.layer_index import LayerFormat
comp = open(sys.argv[1], "rb").read()
loc = formats.TocLocation(
    format=LayerFormat.ZSTD_CHUNKED, offset=8, length=len(comp), tarsplit=None,
    payload_end=1 << 40, producer="containers-storage",
)
index = formats.parse_toc(loc, comp, (1 << 40) + 100, {})
# VmHWM is this process's own peak: ru_maxrss keeps the parent's across exec (vfork).
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
print(index.node_count(), hwm)
"""


def test_a_10_mb_toc_parses_under_256_mb(tmp_path: Path) -> None:
    """The worst 10 MB TOC found: 325 000 one-line directory entries (the most nodes per
    byte).  Parsed in a child process whose peak RSS (interpreter included) is read."""
    parts = []
    size = 0
    while size < 10_000_000:
        e = f'{{"name":"{len(parts):x}/","type":"dir"}}'
        parts.append(e)
        size += len(e) + 1
    toc = ('{"version":1,"entries":[' + ",".join(parts) + "]}").encode()
    path = tmp_path / "manifest.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(toc))
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    nodes, maxrss_kib = map(int, r.stdout.split())
    assert nodes == len(parts) + 1
    assert maxrss_kib < 256 * 1024, f"peak RSS {maxrss_kib // 1024} MiB"


def test_the_streaming_toc_reader_reads_what_json_loads_reads() -> None:
    """Key order, other members, whitespace and escapes: the same entries as json.loads."""
    from alsd.oci import toc_json

    text = (
        ' \n{ "extra" : [1, {"a": null}], "entries" :\t[ {"name": "a\\u00e9", "type": "dir"} ,'
        '{"name":"b","type":"reg","size":0}],"version":1 }\n'
    )
    seen: list[object] = []
    rest = toc_json.scan_toc(text, seen.append)
    want = json.loads(text)
    assert seen == want["entries"]
    assert rest == {"extra": want["extra"], "entries": None, "version": 1}
    for bad in ['{"entries": [1,]}', '{"entries": []} x', "[1]", '{"a" 1}', '{"entries": [}']:
        with pytest.raises(FormatError):
            toc_json.scan_toc(bad, seen.append)
    with pytest.raises(FormatError, match="more than one"):
        toc_json.scan_toc('{"entries": [], "entries": []}', seen.append)
