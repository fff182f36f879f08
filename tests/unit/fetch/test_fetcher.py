"""The fetcher driven through fakes behind its Protocols (no registry, no disk).

tests/integration/test_engine.py runs the same paths against the real registry and
chunk store; here request counts and a corrupt range are set up directly.
"""

from __future__ import annotations

import asyncio

import pytest

from alsd.errors import IntegrityError
from alsd.fetch.fetcher import BlobSource, Fetcher
from alsd.fetch.scheduler import Priority, Scheduler
from alsd.oci import formats
from alsd.oci.layer_index import Chunk, LayerIndex
from alsd.oci.reference import parse_reference
from tests.support.fakes import FakeChunkStore, FakeRegistry, make_image

REF = "registry.example/f/g:1"
# Content that differs from chunk to chunk (equal chunks would share one digest).
A = bytes(i % 251 for i in range(100_000))
B = bytes(i * 7 % 253 for i in range(50_000))


@pytest.fixture
def setup() -> tuple[FakeRegistry, BlobSource, LayerIndex]:
    reg = FakeRegistry()
    img = make_image(REF, [{"a": A, "b": B}], chunk_size=16 << 10)
    reg.add(img)
    layer = img.layers[0]
    index = formats.index_blob(layer.blob, {}, None)
    source = BlobSource(
        name="test",
        ref=parse_reference(REF),
        blob_digest=layer.blob_digest,
        format=index.format,
        blob_size=len(layer.blob),
        path_of=index.path,
    )
    return reg, source, index


def chunks_of(index: LayerIndex, path: str) -> list[tuple[int, Chunk]]:
    node = index.find(path)
    assert node is not None
    return [(node, c) for c in index.chunks(node)]


async def test_one_request_for_neighbouring_chunks_then_the_store(
    setup: tuple[FakeRegistry, BlobSource, LayerIndex],
) -> None:
    reg, source, index = setup
    store = FakeChunkStore()
    f = Fetcher(reg, store, Scheduler(4), merge_gap_bytes=64 << 10)
    try:
        wanted = chunks_of(index, "a")
        got = await f.get_chunks(source, wanted)
        assert b"".join(got[c.digest] for _, c in wanted) == A
        assert len(reg.range_calls) == 1  # all of a's chunks in one range request
        assert source.counter.requests == 1
        assert len(store.chunks) == len({c.digest for _, c in wanted})
        again = await f.get_chunks(source, wanted)
        assert again == got
        assert len(reg.range_calls) == 1  # served by the store
        assert f.stats.chunk_hits == len(again)
    finally:
        await f.close()


async def test_concurrent_readers_share_one_fetch(
    setup: tuple[FakeRegistry, BlobSource, LayerIndex],
) -> None:
    reg, source, index = setup
    f = Fetcher(reg, FakeChunkStore(), Scheduler(4))
    try:
        wanted = chunks_of(index, "b")
        results = await asyncio.gather(*(f.get_chunks(source, wanted) for _ in range(5)))
        assert all(r == results[0] for r in results)
        assert len(reg.range_calls) == 1
        assert f.stats.inflight_joins == 4 * len(wanted)
    finally:
        await f.close()


async def test_a_chunk_that_does_not_verify_is_an_error_and_not_stored(
    setup: tuple[FakeRegistry, BlobSource, LayerIndex],
) -> None:
    reg, source, index = setup
    store = FakeChunkStore()
    f = Fetcher(reg, store, Scheduler(4))
    try:
        (node, chunk), *_ = chunks_of(index, "b")
        reg.corrupt[source.blob_digest] = chunk.blob_offset + 30
        with pytest.raises(IntegrityError):
            await f.get_chunks(source, [(node, chunk)], Priority.DEMAND)
        assert not store.has(chunk.digest)
        assert f.stats.integrity_errors == 1
    finally:
        await f.close()


async def test_stored_slices_read_only_the_slice(
    setup: tuple[FakeRegistry, BlobSource, LayerIndex],
) -> None:
    reg, source, index = setup
    store = FakeChunkStore()
    f = Fetcher(reg, store, Scheduler(4))
    try:
        wanted = chunks_of(index, "a")
        assert await f.get_stored_slices([(wanted[0][1], 0, 10)]) is None  # not stored yet
        await f.get_chunks(source, wanted)
        assert await f.get_stored_slices([(wanted[0][1], 5, 15)]) == [A[5:15]]
        f.advise_next([c for _, c in wanted], wanted[0][1])
        assert store.advised == [wanted[1][1].digest]
    finally:
        await f.close()


class _SlowStore(FakeChunkStore):
    """A chunk store whose writes wait until the test opens ``gate`` (a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.writing = asyncio.Event()

    async def put(self, digest: str, data: bytes) -> bool:
        self.writing.set()
        await self.gate.wait()
        return await super().put(digest, data)


async def test_readers_get_verified_chunks_before_they_are_stored(
    setup: tuple[FakeRegistry, BlobSource, LayerIndex],
) -> None:
    reg, source, index = setup
    store = _SlowStore()
    f = Fetcher(reg, store, Scheduler(4))
    try:
        wanted = chunks_of(index, "b")
        got = await asyncio.wait_for(f.get_chunks(source, wanted), 10)
        assert b"".join(got[c.digest] for _, c in wanted) == B
        assert store.writing.is_set() and not store.chunks  # served while still writing
        # A reader arriving while the chunks are being written joins them: no new request.
        again = await asyncio.wait_for(f.get_chunks(source, wanted), 10)
        assert again == got
        assert len(reg.range_calls) == 1
        store.gate.set()
        for _ in range(100):
            if f.inflight_count() == 0:
                break
            await asyncio.sleep(0.01)
        assert f.inflight_count() == 0
        assert len(store.chunks) == len({c.digest for _, c in wanted})
    finally:
        store.gate.set()
        await f.close()


async def test_a_fetch_that_keeps_nothing_returns_once_its_chunks_are_stored(
    setup: tuple[FakeRegistry, BlobSource, LayerIndex],
) -> None:
    """Prefetch and background fetch (keep=False) promise stored chunks."""
    reg, source, index = setup
    store = _SlowStore()
    f = Fetcher(reg, store, Scheduler(4))
    try:
        wanted = chunks_of(index, "b")
        task = asyncio.create_task(f.get_chunks(source, wanted, Priority.PREFETCH, keep=False))
        await asyncio.wait_for(store.writing.wait(), 10)
        await asyncio.sleep(0.05)
        assert not task.done()  # verified, but not yet written
        store.gate.set()
        assert await asyncio.wait_for(task, 10) == {}
        assert all(store.has(c.digest) for _, c in wanted)
    finally:
        store.gate.set()
        await f.close()
