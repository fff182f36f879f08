"""fetcher.plan_ranges: how chunks are grouped into registry range requests."""

from __future__ import annotations

from alsd.fetch.fetcher import plan_ranges
from alsd.oci.layer_index import Chunk


def _chunk(start: int, end: int) -> Chunk:
    return Chunk(file_offset=0, size=1, blob_offset=start, inner_offset=0, fetch_end=end,
                 digest=f"sha256:{start:064x}")


def test_adjacent_chunks_merge_only_within_the_bound() -> None:
    chunks = [_chunk(i * 100, (i + 1) * 100) for i in range(10)]  # eStargz: back to back
    groups = plan_ranges(chunks, merge_gap_bytes=1000, max_request_bytes=300)
    assert [(s, e) for s, e, _ in groups] == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert sum(len(m) for _, _, m in groups) == 10
    # Without a tight bound they are one range.
    assert [(s, e) for s, e, _ in plan_ranges(chunks, 0, 10_000)] == [(0, 1000)]


def test_overlapping_chunks_always_merge_and_gaps_respect_the_setting() -> None:
    # Legacy stargz: chunks of one gzip member share compressed bytes.
    shared = [_chunk(0, 500), _chunk(0, 500), _chunk(400, 900)]
    assert [(s, e) for s, e, _ in plan_ranges(shared, 0, 100)] == [(0, 900)]
    gapped = [_chunk(0, 100), _chunk(150, 200), _chunk(1000, 1100)]
    assert [(s, e) for s, e, _ in plan_ranges(gapped, 60, 10_000)] == [(0, 200), (1000, 1100)]
