"""Resident size of a parsed LayerIndex: builds a synthetic 100 000-entry eStargz TOC,
parses it with the real reader and prints the bytes per TOC entry held by the index.

Run from the repository root: ``python -m bench.index_memory [ENTRIES]``.
The target is < 200 bytes per entry (developer-notes/interfaces.md).
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import sys
import tarfile
import tracemalloc
from typing import Any

from alsd.oci import formats
from alsd.oci.layer_index import LayerFormat


def synthetic_toc(n: int) -> tuple[bytes, int]:
    """~5% dirs, ~5% symlinks, the rest regular files (1 in 10 with 3 chunks)."""
    entries: list[dict[str, Any]] = []
    offset = 512
    digest = "sha256:" + hashlib.sha256(b"x").hexdigest()
    dirs = max(1, n // 20)
    for d in range(dirs):
        entries.append({"name": f"usr/share/pkg{d:05d}/", "type": "dir", "mode": 0o755})
    i = 0
    while len(entries) < n:
        parent = f"usr/share/pkg{i % dirs:05d}"
        if i % 20 == 0:
            entries.append({"name": f"{parent}/link{i}", "type": "symlink", "linkName": "../x"})
        else:
            chunks = 3 if i % 10 == 1 else 1
            size = 4096 * chunks
            entries.append(
                {
                    "name": f"{parent}/file{i:06d}.txt",
                    "type": "reg",
                    "size": size,
                    "mode": 0o644,
                    "modtime": "2024-01-01T00:00:00Z",
                    "offset": offset,
                    "digest": digest,
                    "chunkSize": 4096 if chunks > 1 else 0,
                    "chunkDigest": digest,
                }
            )
            offset += 1024
            for c in range(1, chunks):
                entries.append(
                    {
                        "name": f"{parent}/file{i:06d}.txt",
                        "type": "chunk",
                        "offset": offset,
                        "chunkOffset": 4096 * c,
                        "chunkSize": 4096 if c < chunks - 1 else 0,
                        "chunkDigest": digest,
                    }
                )
                offset += 1024
        i += 1
    toc = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(toc)
    member = gzip.compress(info.tobuf() + toc + bytes(-len(toc) % 512 + 1024), mtime=0)
    return member, offset


def measure(n: int = 100_000) -> float:
    member, toc_offset = synthetic_toc(n)
    loc = formats.TocLocation(
        format=LayerFormat.ESTARGZ,
        offset=toc_offset,
        length=len(member),
        tarsplit=None,
        payload_end=toc_offset,
    )
    blob_size = toc_offset + len(member) + 51
    tracemalloc.start()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    index = formats.parse_toc(loc, member, blob_size, {})
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_entry = (after - before) / n
    print(
        f"{n} TOC entries ({index.node_count()} nodes, {index.chunk_count()} chunks): "
        f"{after - before} bytes resident, {per_entry:.1f} bytes per entry"
    )
    return per_entry


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
