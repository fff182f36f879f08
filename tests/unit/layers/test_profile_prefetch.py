"""Profile prefetch in the layer manager, through the fakes: the profile's chunks are
requested in the profile's order (not the blob's), before any read, and a registry
profile is asked for once per image."""

from __future__ import annotations

import asyncio
import hashlib

from alsd.config import LayerSettings
from alsd.layers.manager import LayerManager
from alsd.layers.profiles import PROFILE_KIND, profile_record
from alsd.oci.profile import LayerProfile, Profile, ProfileEntry, profile_chunks
from tests.support.fakes import FakeChunkStore, FakeMetadata, FakeRegistry, make_image

REF = "registry.example/p/q:1"
# 8 files of 3 chunks each (distinct content, so no chunk is shared).
FILES = {
    f"f{i}": b"".join(hashlib.sha256(b"%d-%d" % (i, j)).digest() for j in range(3 * 128))
    for i in range(8)
}
ORDER = [f"f{i}" for i in (6, 1, 7, 3)]  # not the blob's order


def settings(**kw: object) -> LayerSettings:
    base: dict[str, object] = {
        "prefetch_landmark": False,
        "prefetch_background": False,
        "readahead_bytes": 0,
        "fetch_concurrency": 2,
        # One chunk per request, so the order of the requests shows the order of fetching.
        "prefetch_request_bytes": 1,
        "merge_gap_bytes": 0,
    }
    return LayerSettings(**{**base, **kw})  # type: ignore[arg-type]


async def _until(pred: object) -> None:
    assert callable(pred)
    for _ in range(500):
        if pred():
            return
        await asyncio.sleep(0.01)  # polling interval
    raise AssertionError("timed out")


async def test_profile_chunks_are_fetched_first_in_profile_order() -> None:
    registry = FakeRegistry()
    img = make_image(REF, [FILES], chunk_size=4096)
    registry.add(img)
    digest = "sha256:" + hashlib.sha256(img.manifest).hexdigest()
    blob = img.layers[0].blob_digest
    meta = FakeMetadata()
    entries = tuple(ProfileEntry(p, 0, len(FILES[p])) for p in ORDER)
    await meta.save_async(
        PROFILE_KIND, digest, profile_record(REF, Profile((LayerProfile(blob, entries),)))
    )
    store = FakeChunkStore()
    m = LayerManager(registry, store, meta, settings())
    await m.load_state()
    try:
        layer = await m.get_layer(REF, blob)
        await _until(lambda: layer.profile_state == "done")
        chunks = profile_chunks(layer.index, entries)
        assert len(chunks) == 12 and layer.profile_chunks == 12
        assert all(store.has(c.digest) for _, c in chunks)
        # The requests after the footer and TOC, in order: one per chunk, profile order.
        fetched = [r[0] for d, r in registry.range_calls if d == blob][2:]
        assert fetched == [(c.blob_offset, c.fetch_end) for _, c in chunks]
        # Only the profile's files: the others are still absent.
        other = layer.index.find("f0")
        assert other is not None
        assert not any(store.has(c.digest) for c in layer.index.chunks(other))
    finally:
        await m.close()


async def test_registry_profile_is_asked_once_per_image() -> None:
    registry = FakeRegistry()
    img = make_image(REF, [FILES, {"x": b"x"}], chunk_size=4096)
    registry.add(img)
    asked: list[tuple[str, str]] = []

    async def lookup(ref: str, image: str) -> Profile | None:
        asked.append((ref, image))
        return None

    m = LayerManager(registry, FakeChunkStore(), FakeMetadata(), settings(),
                     profile_lookup=lookup)  # fmt: skip
    try:
        layers = [await m.get_layer(REF, la.blob_digest) for la in img.layers]
        await _until(lambda: all(la.profile_state == "none" for la in layers))
        digest = "sha256:" + hashlib.sha256(img.manifest).hexdigest()
        assert asked == [(REF, digest)]
        assert all(la.image_digest == digest for la in layers)
    finally:
        await m.close()


async def test_no_read_ahead_for_chunks_the_profile_prefetch_fetches() -> None:
    registry = FakeRegistry()
    img = make_image(REF, [FILES], chunk_size=4096)
    registry.add(img)
    digest = "sha256:" + hashlib.sha256(img.manifest).hexdigest()
    blob = img.layers[0].blob_digest
    meta = FakeMetadata()
    entries = tuple(ProfileEntry(p, 0, len(FILES[p])) for p in ORDER)
    await meta.save_async(
        PROFILE_KIND, digest, profile_record(REF, Profile((LayerProfile(blob, entries),)))
    )
    m = LayerManager(registry, FakeChunkStore(), meta, settings(readahead_bytes=8192))
    await m.load_state()
    try:
        layer = await m.get_layer(REF, blob)
        registry.gate = asyncio.Event()  # hold the profile prefetch's requests
        await _until(lambda: layer.profile_state == "running")

        async def read(path: str) -> asyncio.Task[bytes]:
            node = layer.index.find(path)
            assert node is not None
            task = asyncio.create_task(m.read(layer, node, 0, len(FILES[path])))  # to its end
            for _ in range(5):
                await asyncio.sleep(0)
            return task

        in_profile = await read(ORDER[1])  # f1: files follow it
        assert m.stats.readahead_requests == 0
        outside = await read("f0")
        assert m.stats.readahead_requests == 1
        registry.gate.set()
        assert await in_profile == FILES[ORDER[1]]
        assert await outside == FILES["f0"]
    finally:
        registry.gate = None
        await m.close()
