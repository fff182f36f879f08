"""The layer engine against a real docker-registry holding the fixture images.

Every test reads through the real RegistryClient, ChunkStore and MetadataStore. Registry
requests are counted with the client's ByteCounter, which the engine passes on every call.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from alsd.config import LayerSettings
from alsd.errors import IntegrityError, NotLazyError, UnknownLayer
from alsd.layers.manager import LayerManager
from alsd.layers.model import Layer
from alsd.oci.layer_index import Chunk
from alsd.registry.client import RegistryClient
from alsd.registry.regconf import RegistriesConf, RegistryEntry
from alsd.storage.chunkstore import ChunkStore
from alsd.storage.metadata import MetadataStore
from tests.support.oci_layout import OciLayout
from tests.support.registry import RegistryServer
from tests.support.registry import registry as shared_registry  # noqa: F401

pytestmark = pytest.mark.registry

REPO = Path(__file__).resolve().parents[2]
LAZY_TAGS = ["esgz", "esgz-noopt", "zstdchunked-podman43", "zstdchunked-podman54",
             "zstdchunked-stargz"]
ALL_TAGS = ["gzip", *LAZY_TAGS]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    data: Path  # the registry's storage root

    def blob_file(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.data / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


@pytest.fixture(scope="module")
def registry(shared_registry: RegistryServer) -> Registry:  # noqa: F811
    """The shared real docker-registry with every fixture tag pushed."""
    for tag in ALL_TAGS:
        shared_registry.push_fixture(tag)
    return Registry(shared_registry.address, shared_registry.workdir / "storage")


@pytest.fixture(scope="module")
def layout(fixtures: Path) -> OciLayout:
    return OciLayout(fixtures / "images")


@pytest.fixture(scope="module")
def gzip_files(layout: OciLayout) -> list[dict[str, bytes]]:
    """Regular files of each layer of the gzip tag, extracted with tarfile (no alsd code)."""
    out: list[dict[str, bytes]] = []
    for layer in layout.image("gzip").layers:
        files: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(layout.blob(layer.digest)), mode="r:gz") as tf:
            for m in tf:
                name = m.name.removeprefix("./").rstrip("/")
                if m.isreg() and not name.rsplit("/", 1)[-1].startswith(".wh."):
                    f = tf.extractfile(m)
                    assert f is not None
                    files[name] = f.read()
        out.append(files)
    return out


def _client(reg: Registry) -> RegistryClient:
    conf = RegistriesConf(registries=(RegistryEntry(reg.host, reg.host, insecure=True),))
    return RegistryClient(registries=conf)


@dataclass
class Env:
    engine: LayerManager
    store: ChunkStore
    client: RegistryClient
    state: Path


class EngineFactory:
    def __init__(self, reg: Registry, state: Path) -> None:
        self.reg = reg
        self.state = state
        self.envs: list[Env] = []

    async def make(self, *, state: Path | None = None, max_bytes: int = 1 << 30,
                   **settings: object) -> Env:
        state = state or self.state
        # Each test counts the requests and chunks of what it reads: what the engine would
        # fetch by itself (prefetch, background, read-ahead) is off unless a test asks.
        settings.setdefault("prefetch_landmark", False)
        settings.setdefault("prefetch_background", False)
        settings.setdefault("readahead_bytes", 0)
        store = ChunkStore(state / "chunks", max_bytes)
        await store.open()
        meta = MetadataStore(state / "meta")
        client = _client(self.reg)
        engine = LayerManager(client, store, meta, LayerSettings(**settings))  # type: ignore[arg-type]
        await engine.load_state()
        env = Env(engine, store, client, state)
        self.envs.append(env)
        return env

    async def close(self, env: Env) -> None:
        if env in self.envs:
            self.envs.remove(env)
            await env.engine.close()
            await env.store.close()
            await env.client.close()


@pytest.fixture
async def factory(registry: Registry, tmp_path: Path) -> AsyncIterator[EngineFactory]:
    f = EngineFactory(registry, tmp_path / "state")
    yield f
    for env in list(f.envs):
        await f.close(env)


def _ref(reg: Registry, tag: str) -> str:
    return f"{reg.host}/fx:{tag}"


async def _read_all(engine: LayerManager, layer: Layer, path: str, piece: int = 0) -> bytes:
    node = layer.index.find(path)
    assert node is not None, path
    size = layer.index.attr(node).size
    if not piece:
        return await engine.read(layer, node, 0, size + 100)
    out = b""
    for off in range(0, size, piece):
        out += await engine.read(layer, node, off, piece)
    return out


async def _until(pred: object, what: str, timeout_s: float = 60) -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling interval


async def _stored(env: Env) -> None:
    """Until every fetched chunk is in the store (a read returns its verified bytes
    before they are written)."""
    await _until(lambda: env.engine.fetcher.inflight_count() == 0, "the chunk store writes")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("tag", LAZY_TAGS)
async def test_every_file_equals_the_gzip_tag(
    tag: str, registry: Registry, layout: OciLayout, gzip_files: list[dict[str, bytes]],
    factory: EngineFactory,
) -> None:
    env = await factory.make()
    image = layout.image(tag)
    assert len(image.layers) == len(gzip_files)
    for i, desc in enumerate(image.layers):
        layer = await env.engine.get_layer(_ref(registry, tag), desc.digest)
        assert layer.blob_digest == desc.digest
        assert layer.position == i
        for path, content in gzip_files[i].items():
            assert await _read_all(env.engine, layer, path) == content, (tag, path)
            # Unaligned pieces cross chunk boundaries.
            assert await _read_all(env.engine, layer, path, piece=40_000) == content
        node = layer.index.find(next(iter(gzip_files[i])))
        assert node is not None
        size = layer.index.attr(node).size
        assert await env.engine.read(layer, node, size, 10) == b""
        assert await env.engine.read(layer, node, 0, 0) == b""
    # The blob file serves the registry's bytes exactly.
    first = image.layers[0]
    layer = await env.engine.get_layer(_ref(registry, tag), first.digest)
    blob = layout.blob(first.digest)
    assert await env.engine.read_blob(layer, 0, 1000) == blob[:1000]
    assert await env.engine.read_blob(layer, len(blob) - 5, 100) == blob[-5:]


async def test_lookup_by_toc_digest_and_unknown_digests(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    env = await factory.make()
    desc = layout.image("esgz").layers[0]
    toc = desc.annotations["containerd.io/snapshot/stargz/toc.digest"]
    by_toc = await env.engine.get_layer(_ref(registry, "esgz"), toc)
    assert by_toc.blob_digest == desc.digest and by_toc.toc_digest == toc
    assert by_toc is await env.engine.get_layer(_ref(registry, "esgz"), desc.digest)
    with pytest.raises(UnknownLayer):
        await env.engine.get_layer(_ref(registry, "esgz"), "sha256:" + "0" * 64)


async def test_gzip_layer_is_not_lazy_and_the_answer_is_cached(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    env = await factory.make(negative_cache_ttl_s=3600)
    digest = layout.image("gzip").layers[0].digest
    with pytest.raises(NotLazyError):
        await env.engine.get_layer(_ref(registry, "gzip"), digest)
    before = env.engine.registry_counter.requests
    with pytest.raises(NotLazyError):
        await env.engine.get_layer(_ref(registry, "gzip"), digest)
    assert env.engine.registry_counter.requests == before


async def test_two_layers_sharing_content_store_it_once(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    env = await factory.make()
    a = await env.engine.get_layer(_ref(registry, "esgz"), layout.image("esgz").layers[0].digest)
    b_desc = layout.image("zstdchunked-podman54").layers[0]
    b = await env.engine.get_layer(_ref(registry, "zstdchunked-podman54"), b_desc.digest)
    digests_a = {c.digest: n for n, c in a.index.iter_chunks()}
    shared = [(n, c) for n, c in b.index.iter_chunks() if c.digest in digests_a and not c.zeros]
    assert shared, "the fixtures should share some chunk between eStargz and zstd:chunked"
    node_b, chunk = max(shared, key=lambda nc: nc[1].size)
    await env.engine.read(a, digests_a[chunk.digest], 0, 1 << 30)
    await _stored(env)
    assert env.store.has(chunk.digest)
    stored = env.store.stats()
    requests = b.source.counter.requests
    second = await env.engine.read(b, node_b, chunk.file_offset, chunk.size)
    assert "sha256:" + hashlib.sha256(second).hexdigest() == chunk.digest
    assert b.source.counter.requests == requests  # served from the store
    after = env.store.stats()
    assert (after["count"], after["bytes"]) == (stored["count"], stored["bytes"])


async def test_reads_of_stored_chunks_return_exact_slices_without_requests(
    registry: Registry, layout: OciLayout, gzip_files: list[dict[str, bytes]],
    factory: EngineFactory,
) -> None:
    env = await factory.make()
    layer = await env.engine.get_layer(_ref(registry, "esgz"),
                                       layout.image("esgz").layers[0].digest)
    content = gzip_files[0]["data/big.bin"]
    node = layer.index.find("data/big.bin")
    assert node is not None
    chunks = layer.index.chunks(node)
    assert len(chunks) > 2, "the fixture's big file should span several chunks"
    assert await _read_all(env.engine, layer, "data/big.bin") == content
    await _stored(env)
    requests = layer.source.counter.requests
    hits = env.engine.fetcher.stats.chunk_hits
    # Edges: the first and last byte of a chunk, a read across a boundary, one spanning
    # three chunks, the end of the file.
    b1, b2 = chunks[1].file_offset, chunks[2].file_offset
    cases = [(0, 1), (b1 - 1, 1), (b1, 1), (b1 - 7, 20), (b1 - 3, b2 - b1 + 6),
             (len(content) - 5, 100), (b2 + 1, chunks[2].size - 1)]
    for off, size in cases:
        got = await env.engine.read(layer, node, off, size)
        assert got == content[off : off + size], (off, size)
    assert layer.source.counter.requests == requests
    assert env.engine.fetcher.stats.chunk_hits > hits


async def test_status_says_how_much_of_a_layer_is_local_and_which_reads_fetched(
    registry: Registry, layout: OciLayout, gzip_files: list[dict[str, bytes]],
    factory: EngineFactory,
) -> None:
    env = await factory.make()
    digest = layout.image("esgz").layers[0].digest

    def layer_status() -> dict[str, Any]:
        (st,) = [la for la in env.engine.status()["layers"] if la["digest"] == digest]
        return dict(st)

    layer = await env.engine.get_layer(_ref(registry, "esgz"), digest)
    content = sum(len(v) for v in gzip_files[0].values())  # every regular file's bytes
    st = layer_status()
    assert st["content_bytes"] == content and st["local_bytes"] == 0
    big = gzip_files[0]["data/big.bin"]
    assert await _read_all(env.engine, layer, "data/big.bin") == big
    # A reader gets its chunks before they are written to the store.
    await _until(lambda: env.engine.fetcher.inflight_count() == 0, "the chunk store writes")
    st = layer_status()
    assert st["local_bytes"] == len(big)  # read-ahead is off: exactly what was read
    assert env.engine.stats.reads == env.engine.stats.reads_fetched == 1
    assert await _read_all(env.engine, layer, "data/big.bin") == big  # from the store now
    assert (env.engine.stats.reads, env.engine.stats.reads_fetched) == (2, 1)
    for path in gzip_files[0]:
        await _read_all(env.engine, layer, path)
    await _until(lambda: env.engine.fetcher.inflight_count() == 0, "the chunk store writes")
    assert layer_status()["local_bytes"] == content


async def test_racing_reads_of_one_chunk_fetch_it_once(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    env = await factory.make()
    layer = await env.engine.get_layer(_ref(registry, "esgz"),
                                       layout.image("esgz").layers[0].digest)
    node = layer.index.find("data/big.bin")
    assert node is not None
    before = layer.source.counter.requests
    results = await asyncio.gather(*(env.engine.read(layer, node, 100, 1000) for _ in range(20)))
    assert len(set(results)) == 1 and len(results[0]) == 1000
    assert layer.source.counter.requests - before == 1
    assert env.engine.fetcher.stats.chunks_fetched == 1


async def test_neighbouring_chunks_of_one_read_are_one_request(
    registry: Registry, layout: OciLayout, gzip_files: list[dict[str, bytes]],
    factory: EngineFactory,
) -> None:
    env = await factory.make()
    layer = await env.engine.get_layer(_ref(registry, "esgz"),
                                       layout.image("esgz").layers[0].digest)
    node = layer.index.find("data/big.bin")
    assert node is not None
    assert len(layer.index.chunks(node)) > 2  # 300 000 bytes in 64 KiB chunks
    before = layer.source.counter.requests
    data = await env.engine.read(layer, node, 0, 1 << 30)
    assert data == gzip_files[0]["data/big.bin"]
    assert layer.source.counter.requests - before == 1


async def test_a_flipped_byte_is_an_integrity_error_remembered_and_nothing_is_stored(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    env = await factory.make()
    desc = layout.image("esgz").layers[0]
    layer = await env.engine.get_layer(_ref(registry, "esgz"), desc.digest)
    node = layer.index.find("data/big.bin")
    assert node is not None
    chunk = layer.index.chunks(node)[1]
    # The fault: one byte of the registry's stored blob flipped inside this chunk's
    # compressed range (a registry serving bad bytes; distribution does not re-check).
    # The registry is shared by the session: the original bytes are put back below.
    blob_file = registry.blob_file(desc.digest)
    original = blob_file.read_bytes()
    pos = (chunk.blob_offset + chunk.fetch_end) // 2
    corrupted = bytearray(original)
    corrupted[pos] ^= 0x01
    blob_file.write_bytes(bytes(corrupted))
    try:
        with pytest.raises(IntegrityError):
            await env.engine.read(layer, node, chunk.file_offset, 10)
        assert not env.store.has(chunk.digest)
        assert env.engine.fetcher.stats.integrity_errors == 1
        # Read again: the chunk that failed is remembered, the read fails at once
        # without asking the registry (before, every read fetched and inflated it anew).
        requests = layer.source.counter.requests
        with pytest.raises(IntegrityError, match="failed before"):
            await env.engine.read(layer, node, chunk.file_offset, 10)
        assert layer.source.counter.requests == requests
        assert env.engine.fetcher.stats.known_bad == 1
        assert env.engine.fetcher.stats.integrity_errors == 1
    finally:
        blob_file.write_bytes(original)
    # Only as long as the layer stays resolved: resolved anew (a restarted engine on the
    # same state), the good bytes are fetched and served (nothing bad was cached).
    await factory.close(env)
    env = await factory.make()
    layer = await env.engine.get_layer(_ref(registry, "esgz"), desc.digest)
    assert len(await env.engine.read(layer, node, chunk.file_offset, 10)) == 10
    await _stored(env)
    assert env.store.has(chunk.digest)


def _first_file_chunk(layer: Layer, min_followers: int) -> tuple[int, Chunk, list[Chunk]]:
    """The first chunk in blob order followed by at least ``min_followers`` chunks."""
    order = [(n, c) for n, c in layer.index.iter_chunks() if not c.zeros]
    for i, (node, c) in enumerate(order):
        if len(order) - i - 1 >= min_followers:
            return node, c, [c2 for _, c2 in order[i + 1 :]]
    pytest.fail("the fixture layer has too few chunks")


def _file_then_neighbour_then_other_directory(layer: Layer) -> tuple[int, int, int]:
    """Nodes of three files in blob order, one chunk each: a file, the next one in the same
    directory, then one in another directory (in the esgz-noopt fixture: data/hard,
    data/big.bin, gone/b)."""
    order = [(n, c) for n, c in layer.index.iter_chunks() if not c.zeros]
    idx = layer.index
    for (a, _), (b, _), (c, _) in zip(order, order[1:], order[2:], strict=False):
        one_chunk = all(len(idx.chunks(x)) == 1 for x in (a, b))
        if one_chunk and idx.parent(a) == idx.parent(b) != idx.parent(c):
            return a, b, c
    pytest.fail("the fixture layer has no such files")


async def test_a_file_read_to_its_end_reads_its_directory_ahead(
    registry: Registry, layout: OciLayout, gzip_files: list[dict[str, bytes]],
    factory: EngineFactory,
) -> None:
    desc = layout.image("esgz-noopt").layers[0]
    env = await factory.make(readahead_bytes=1 << 20)
    layer = await env.engine.get_layer(_ref(registry, "esgz-noopt"), desc.digest)
    first, neighbour, other = _file_then_neighbour_then_other_directory(layer)
    idx = layer.index
    (chunk,) = idx.chunks(first)
    before = layer.source.counter.requests
    data = await env.engine.read(layer, first, 0, idx.attr(first).size)
    assert data == gzip_files[0][idx.path(first)]
    await _until(lambda: env.engine.fetcher.inflight_count() == 0, "the read-ahead")
    assert env.engine.stats.readahead_requests == 1
    assert layer.source.counter.requests - before == 2  # the read's, and the read-ahead's
    assert env.store.has(chunk.digest)
    assert env.store.has(idx.chunks(neighbour)[0].digest)
    # Within the window, but in another directory: not read ahead.
    (beyond,) = idx.chunks(other)
    assert beyond.fetch_end - chunk.fetch_end <= 1 << 20
    assert not env.store.has(beyond.digest)
    # What was read ahead is served without a request, and verified like any chunk.
    requests = layer.source.counter.requests
    got = await env.engine.read(layer, neighbour, 0, idx.attr(neighbour).size)
    assert got == gzip_files[0][idx.path(neighbour)]
    assert layer.source.counter.requests == requests


async def test_read_ahead_is_bounded_by_its_window_and_by_a_read_short_of_the_end(
    registry: Registry, layout: OciLayout, factory: EngineFactory, tmp_path: Path
) -> None:
    desc = layout.image("esgz-noopt").layers[0]
    probe = await factory.make()
    layer = await probe.engine.get_layer(_ref(registry, "esgz-noopt"), desc.digest)
    first, neighbour, _ = _file_then_neighbour_then_other_directory(layer)
    (chunk,) = layer.index.chunks(first)
    (next_chunk,) = layer.index.chunks(neighbour)
    await factory.close(probe)
    # A window that ends one byte short of the neighbour: nothing to read ahead.
    env = await factory.make(readahead_bytes=next_chunk.fetch_end - chunk.fetch_end - 1)
    layer = await env.engine.get_layer(_ref(registry, "esgz-noopt"), desc.digest)
    await env.engine.read(layer, first, 0, layer.index.attr(first).size)
    assert env.engine.stats.readahead_requests == 0
    assert not env.store.has(next_chunk.digest)
    await factory.close(env)
    # A wide window, but the read stops short of the end of its file (a fresh store).
    env = await factory.make(state=tmp_path / "fresh", readahead_bytes=1 << 20)
    layer = await env.engine.get_layer(_ref(registry, "esgz-noopt"), desc.digest)
    assert layer.index.attr(first).size > 1
    assert len(await env.engine.read(layer, first, 0, 1)) == 1
    assert env.engine.stats.readahead_requests == 0
    assert not env.store.has(next_chunk.digest)


async def test_no_read_ahead_when_it_is_off_or_everything_is_stored(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    desc = layout.image("esgz-noopt").layers[0]
    env = await factory.make(readahead_bytes=0)
    layer = await env.engine.get_layer(_ref(registry, "esgz-noopt"), desc.digest)
    node, first, followers = _first_file_chunk(layer, 1)
    await env.engine.read(layer, node, first.file_offset, first.size)
    await _stored(env)
    assert env.engine.stats.readahead_requests == 0
    assert env.store.has(first.digest) and not env.store.has(followers[0].digest)
    await factory.close(env)
    # Same store, read-ahead on: the neighbour is fetched once, then never again.
    env = await factory.make(readahead_bytes=1 << 20)
    layer = await env.engine.get_layer(_ref(registry, "esgz-noopt"), desc.digest)
    second = layer.index.find(layer.index.path(node))
    assert second is not None
    await env.engine.read(layer, second, first.file_offset, first.size)  # stored: no miss
    assert env.engine.stats.readahead_requests == 0


async def test_a_corrupt_chunk_read_ahead_is_not_stored_and_the_read_still_works(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    desc = layout.image("esgz-noopt").layers[0]
    env = await factory.make(readahead_bytes=1 << 20)
    layer = await env.engine.get_layer(_ref(registry, "esgz-noopt"), desc.digest)
    # The chunk read is the one just before data/big.bin's in the blob; the read-ahead then
    # takes big.bin (random bytes: a flipped byte in its range changes its content).
    big = layer.index.find("data/big.bin")
    assert big is not None
    bad = layer.index.chunks(big)[0]
    order = [(n, c) for n, c in layer.index.iter_chunks() if not c.zeros]
    k = next(i for i, (_, c) in enumerate(order) if c == bad)
    assert k > 0 and bad.fetch_end - order[k - 1][1].fetch_end <= 1 << 20
    node, first = order[k - 1]
    # The fault: one byte flipped in the registry's stored blob inside the neighbour's
    # compressed range (as in the flipped-byte test above); restored below.
    blob_file = registry.blob_file(desc.digest)
    original = blob_file.read_bytes()
    corrupted = bytearray(original)
    corrupted[(bad.blob_offset + bad.fetch_end) // 2] ^= 0x01
    blob_file.write_bytes(bytes(corrupted))
    try:
        data = await env.engine.read(layer, node, first.file_offset, first.size)
        assert "sha256:" + hashlib.sha256(data).hexdigest() == first.digest
        await _until(lambda: env.engine.stats.readahead_errors == 1, "the read-ahead to fail")
        assert env.engine.fetcher.stats.integrity_errors >= 1
        assert not env.store.has(bad.digest)
    finally:
        blob_file.write_bytes(original)


async def test_prefetch_fetches_exactly_the_prioritised_region(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    env = await factory.make(prefetch_landmark=True)
    desc = layout.image("esgz").layers[0]
    layer = await env.engine.get_layer(_ref(registry, "esgz"), desc.digest)
    idx = layer.index
    assert idx.prefetch == "landmark" and idx.prefetch_end > 0
    await _until(lambda: layer.prefetch_state == "done", "the prefetch")
    inside = [c for _, c in idx.iter_chunks() if c.blob_offset < idx.prefetch_end]
    outside = {c.digest for _, c in idx.iter_chunks() if c.blob_offset >= idx.prefetch_end}
    outside -= {c.digest for c in inside}
    assert inside
    assert all(env.store.has(c.digest) for c in inside)
    assert not any(env.store.has(d) for d in outside)
    assert all(c.fetch_end <= idx.prefetch_end for c in inside)
    # Requests of about prefetch_request_bytes (not one of the whole region: each piece is
    # served as soon as it arrives), no byte outside the region.
    s = env.engine.settings
    assert s.prefetch_request_bytes < idx.prefetch_end
    assert layer.source.counter.requests <= idx.prefetch_end // s.prefetch_request_bytes + 1
    assert layer.source.counter.requests >= 2
    assert layer.source.counter.bytes <= idx.prefetch_end
    assert layer.source.counter.bytes >= sum(c.fetch_end - c.blob_offset for c in inside)
    # The prioritised files are then served without a request.
    before = layer.source.counter.requests
    assert await _read_all(env.engine, layer, "data/small.txt") == b"hello from a fixture\n"
    assert layer.source.counter.requests == before


async def test_background_fetch_completes_the_layer(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    env = await factory.make(prefetch_landmark=True, prefetch_background=True,
                             quiet_period_s=0.0, background_unread_wait_s=0.0)
    layer = await env.engine.get_layer(_ref(registry, "esgz-noopt"),
                                       layout.image("esgz-noopt").layers[0].digest)
    await _until(lambda: layer.background_state == "done", "the background fetch")
    assert all(env.store.has(c.digest) for _, c in layer.index.iter_chunks() if not c.zeros)
    before = layer.source.counter.requests
    assert len(await _read_all(env.engine, layer, "data/big.bin")) == 300_000
    assert layer.source.counter.requests == before


async def test_eviction_under_a_small_limit_keeps_serving_correct_bytes(
    registry: Registry, layout: OciLayout, gzip_files: list[dict[str, bytes]],
    factory: EngineFactory,
) -> None:
    limit = 150_000
    env = await factory.make(max_bytes=limit)
    image = layout.image("esgz")
    for _ in range(2):
        for i, desc in enumerate(image.layers):
            layer = await env.engine.get_layer(_ref(registry, "esgz"), desc.digest)
            for path, content in gzip_files[i].items():
                assert await _read_all(env.engine, layer, path) == content, path
            assert env.store.stats()["bytes"] <= limit


_CHILD = r"""
import asyncio, sys, os
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from alsd.storage.chunkstore import ChunkStore
from alsd.config import LayerSettings
from alsd.layers.manager import LayerManager
from alsd.storage.metadata import MetadataStore
from alsd.registry.regconf import RegistriesConf, RegistryEntry
from alsd.registry.client import RegistryClient

async def main() -> None:
    host, state = sys.argv[1], Path(sys.argv[2])
    digests = sys.argv[4:]
    store = ChunkStore(state / "chunks", 1 << 30)
    await store.open()
    conf = RegistriesConf(registries=(RegistryEntry(host, host, insecure=True),))
    engine = LayerManager(RegistryClient(registries=conf), store, MetadataStore(state / "meta"),
                    LayerSettings(prefetch_landmark=False, prefetch_background=False))
    ref = f"{host}/fx:esgz"
    layers = [await engine.get_layer(ref, d) for d in digests]
    small = layers[0].index.find("data/small.txt")
    await engine.read(layers[0], small, 0, 100)
    while engine.fetcher.inflight_count():  # the read's chunk is written to the store
        await asyncio.sleep(0.01)
    print("READY", flush=True)
    while True:  # keep fetching until killed: every chunk of every layer, again and again
        for layer in layers:
            for node, chunk in layer.index.iter_chunks():
                await engine.read(layer, node, chunk.file_offset, chunk.size)

asyncio.run(main())
"""


async def test_restart_after_sigkill_needs_no_registry_request(
    registry: Registry, layout: OciLayout, gzip_files: list[dict[str, bytes]],
    factory: EngineFactory, tmp_path: Path,
) -> None:
    digests = [d.digest for d in layout.image("esgz").layers]
    state = factory.state
    state.mkdir(parents=True)
    with (tmp_path / "child.log").open("wb") as errlog:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, registry.host, str(state), str(REPO), *digests,
            stdout=subprocess.PIPE, stderr=errlog,
        )
        try:
            assert child.stdout is not None
            line = await child.stdout.readline()
            assert line.strip() == b"READY", (tmp_path / "child.log").read_text()
        finally:
            os.kill(child.pid, signal.SIGKILL)  # mid-fetch: the child never stops fetching
            await child.wait()
    env = await factory.make()
    layers = [await env.engine.get_layer(_ref(registry, "esgz"), d) for d in digests]
    assert all(layer.from_metadata for layer in layers)
    assert await _read_all(env.engine, layers[0], "data/small.txt") == b"hello from a fixture\n"
    assert env.engine.registry_counter.requests == 0
    # Whatever the killed process left half-done is fetched again, correctly.
    for i, layer in enumerate(layers):
        for path, content in gzip_files[i].items():
            assert await _read_all(env.engine, layer, path) == content, path


async def test_a_corrupt_metadata_file_is_discarded(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    digests = [d.digest for d in layout.image("esgz").layers]
    ref = _ref(registry, "esgz")
    env = await factory.make()
    for d in digests:
        await env.engine.get_layer(ref, d)
    await factory.close(env)
    meta = MetadataStore(factory.state / "meta")
    path = meta.path_for("layer", f"{ref}@@{digests[0]}")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))

    env = await factory.make()
    first = await env.engine.get_layer(ref, digests[0])
    second = await env.engine.get_layer(ref, digests[1])
    assert not first.from_metadata  # resolved afresh from the registry
    assert second.from_metadata
    assert env.engine.registry_counter.requests > 0
    assert await _read_all(env.engine, first, "data/small.txt") == b"hello from a fixture\n"
    assert meta.load("layer", f"{ref}@@{digests[0]}") is not None  # rewritten, valid again


async def test_use_release_drops_the_layer_after_the_grace_period(
    registry: Registry, layout: OciLayout, factory: EngineFactory
) -> None:
    env = await factory.make(release_grace_s=0.0)
    digest = layout.image("esgz").layers[0].digest
    layer = await env.engine.get_layer(_ref(registry, "esgz"), digest)
    env.engine.use(layer)
    env.engine.use(layer)
    env.engine.release(layer)
    await asyncio.sleep(0)
    assert layer in env.engine.layers()
    env.engine.release(layer)
    await _until(lambda: layer not in env.engine.layers(), "the drop")
    again = await env.engine.get_layer(_ref(registry, "esgz"), digest)
    assert again is not layer and again.layer_no != layer.layer_no
    status = env.engine.status()
    assert status["layers"][0]["digest"] == digest
