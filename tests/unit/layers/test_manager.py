"""The layer manager driven through fakes behind its Protocols (no registry, no disk).

The same paths run against the real registry, chunk store and metadata store in
tests/integration/test_engine.py; here the registry's answers, faults and request counts
are set directly (a hanging registry, a corrupt range, a failing resolution).
"""

from __future__ import annotations

import asyncio

import pytest

from alsd.config import LayerSettings
from alsd.errors import IntegrityError, RegistryError, Transient, UnknownLayer
from alsd.layers.manager import LayerManager
from alsd.layers.model import BackgroundState, PrefetchState
from tests.support.fakes import FakeChunkStore, FakeMetadata, FakeRegistry, make_image

REF = "registry.example/a/b:1"
FILES = [
    {"etc/hello": b"hello\n", "bin/big": bytes(range(256)) * 1024},
    {"usr/lib/x": b"x" * 100_000},
]


def settings(**kw: object) -> LayerSettings:
    base: dict[str, object] = {
        "prefetch_landmark": False,
        "prefetch_background": False,
        "readahead_bytes": 0,
    }
    return LayerSettings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add(make_image(REF, FILES))
    return reg


async def read_file(m: LayerManager, ref: str, digest: str, path: str) -> bytes:
    layer = await m.get_layer(ref, digest)
    node = layer.index.find(path)
    assert node is not None, path
    return await m.read(layer, node, 0, layer.index.attr(node).size + 10)


async def test_blob_and_toc_digest_name_the_same_layer(registry: FakeRegistry) -> None:
    img = registry.images[REF]
    m = LayerManager(registry, FakeChunkStore(), None, settings())
    try:
        by_blob = await m.get_layer(REF, img.layers[0].blob_digest)
        by_toc = await m.get_layer(REF, img.layers[0].toc_digest)
        assert by_blob is by_toc
        assert await read_file(m, REF, img.layers[0].toc_digest, "etc/hello") == b"hello\n"
        big = await read_file(m, REF, img.layers[0].blob_digest, "bin/big")
        assert big == bytes(range(256)) * 1024
        assert registry.resolves == 1
    finally:
        await m.close()


async def test_concurrent_lookups_resolve_once(registry: FakeRegistry) -> None:
    img = registry.images[REF]
    registry.gate = asyncio.Event()
    m = LayerManager(registry, FakeChunkStore(), None, settings())
    try:
        lookups = [
            asyncio.create_task(m.get_layer(REF, la.blob_digest)) for la in img.layers * 3
        ]
        await asyncio.sleep(0.01)
        registry.gate.set()
        layers = await asyncio.gather(*lookups)
        assert len({id(la) for la in layers}) == 2
        assert registry.resolves == 1
        # Per layer one read of the tail, then one of its TOC: nothing twice.
        reads = sorted(d for d, _ in registry.range_calls)
        assert reads == sorted(la.blob_digest for la in img.layers * 2)
    finally:
        await m.close()


async def test_a_failed_image_is_remembered(registry: FakeRegistry) -> None:
    registry.fail_resolve = lambda: RegistryError("registry down")
    m = LayerManager(registry, FakeChunkStore(), None, settings(negative_cache_ttl_s=60))
    digest = registry.images[REF].layers[0].blob_digest
    try:
        for _ in range(3):
            with pytest.raises(RegistryError, match="registry down"):
                await m.get_layer(REF, digest)
        assert registry.resolves == 1
        assert m.stats.negative_hits == 2
    finally:
        await m.close()


async def test_unknown_digest_is_unknown_layer(registry: FakeRegistry) -> None:
    m = LayerManager(registry, FakeChunkStore(), None, settings())
    try:
        with pytest.raises(UnknownLayer):
            await m.get_layer(REF, "sha256:" + "0" * 64)
    finally:
        await m.close()


async def test_a_silent_registry_times_out_once_per_image(registry: FakeRegistry) -> None:
    registry.gate = asyncio.Event()  # never set: the registry does not answer
    m = LayerManager(registry, FakeChunkStore(), None, settings(resolve_timeout_s=0.05))
    img = registry.images[REF]
    try:
        with pytest.raises(Transient, match="not resolved within"):
            await m.get_layer(REF, img.layers[0].blob_digest)
        # The next layer of the same pull answers at once instead of waiting again.
        with pytest.raises(Transient, match="still resolving"):
            await m.get_layer(REF, img.layers[1].blob_digest)
        assert m.stats.resolve_timeouts == 1
    finally:
        await m.close()


async def test_a_corrupt_chunk_is_eio_and_never_stored(registry: FakeRegistry) -> None:
    img = registry.images[REF]
    store = FakeChunkStore()
    m = LayerManager(registry, store, None, settings())
    try:
        layer = await m.get_layer(REF, img.layers[1].blob_digest)
        node = layer.index.find("usr/lib/x")
        assert node is not None
        chunk = layer.index.chunks(node)[0]
        registry.corrupt[layer.blob_digest] = chunk.blob_offset + 20
        with pytest.raises(IntegrityError):
            await m.read(layer, node, 0, 100)
        assert not store.has(chunk.digest)
        assert m.fetcher.stats.integrity_errors == 1
    finally:
        await m.close()


async def test_records_answer_a_restart_without_the_registry(registry: FakeRegistry) -> None:
    img = registry.images[REF]
    meta = FakeMetadata()
    m = LayerManager(registry, FakeChunkStore(), meta, settings())
    try:
        await m.get_layer(REF, img.layers[0].blob_digest)
        await asyncio.sleep(0.01)  # let the other layer's resolution finish and persist
    finally:
        await m.close()
    calls = len(registry.range_calls)
    m2 = LayerManager(registry, FakeChunkStore(), meta, settings())
    try:
        await m2.load_state()
        layer = await m2.get_layer(REF, img.layers[1].toc_digest)
        assert layer.from_metadata
        assert registry.resolves == 1  # the image came from its record
        assert len(registry.range_calls) == calls  # and the TOC too
        assert m2.stats.layers_from_metadata >= 1
    finally:
        await m2.close()


async def test_a_released_layer_is_dropped_and_its_tasks_cancelled(
    registry: FakeRegistry,
) -> None:
    img = registry.images[REF]
    registry.gate = asyncio.Event()
    m = LayerManager(
        registry,
        FakeChunkStore(),
        None,
        settings(release_grace_s=0.01, prefetch_background=True, quiet_period_s=0.0,
                 background_unread_wait_s=0.0),
    )  # fmt: skip
    try:
        registry.gate.set()
        layer = await m.get_layer(REF, img.layers[0].blob_digest)
        m.use(layer)
        registry.gate.clear()  # the background fetch now hangs in the registry
        await asyncio.sleep(0.05)
        assert layer.background_state == BackgroundState.RUNNING
        m.release(layer)
        await asyncio.sleep(0.05)
        assert layer not in m.layers()
        assert layer.background_state == BackgroundState.CANCELLED
        assert layer.prefetch_state == PrefetchState.DISABLED  # [prefetch] landmark = false
        status = m.status()
        assert all(la["digest"] != layer.blob_digest for la in status["layers"])
    finally:
        registry.gate.set()
        await m.close()


async def test_the_background_fetch_waits_for_the_first_read(registry: FakeRegistry) -> None:
    """Not while podman pulls: the rest of a layer is fetched only once a container reads
    from it (and then only after a quiet period, here 0)."""
    img = registry.images[REF]
    store = FakeChunkStore()
    m = LayerManager(registry, store, None,
                     settings(prefetch_background=True, quiet_period_s=0.0))  # fmt: skip
    try:
        layer = await m.get_layer(REF, img.layers[0].blob_digest)
        m.use(layer)  # what podman does when it pulls
        resolution = len(registry.range_calls)
        await asyncio.sleep(0.2)
        assert layer.background_state == BackgroundState.WAITING
        assert len(registry.range_calls) == resolution  # nothing fetched yet
        assert await read_file(m, REF, img.layers[0].blob_digest, "etc/hello") == b"hello\n"
        for _ in range(200):
            if layer.background_state == BackgroundState.DONE:
                break
            await asyncio.sleep(0.01)
        assert layer.background_state == BackgroundState.DONE
        assert all(store.has(c.digest) for _, c in layer.index.iter_chunks() if not c.zeros)
    finally:
        await m.close()
