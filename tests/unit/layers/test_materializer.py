"""When the layer manager materialises layers: complete -> directory -> symlink; restarts
(known at once, damaged ones rebuilt from chunks); the shared disk budget; the switch.

The registry and metadata are the in-memory fakes; the chunk store and the layer
directories are the real ones on disk (the budget and the extraction are what is tested).
Needs root, like the extraction (chown, mknod).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from alsd.config import LayerSettings
from alsd.layers.manager import LayerManager
from alsd.layers.materialize import LayerDirs, layer_key
from alsd.layers.model import Layer
from alsd.storage.chunkstore import ChunkStore
from tests.support.fakes import FakeMetadata, FakeRegistry, make_image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="extraction needs root")

def noise(n: int, seed: int) -> bytes:
    """Content whose chunks all differ (identical chunks would be stored once)."""
    out = bytearray()
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{len(out)}".encode()).digest()
    return bytes(out[:n])


REF = "registry.example/a/b:1"
FILES = [
    {"etc/hello": b"hello\n", "bin/big": noise(262_144, 1)},
    {"usr/lib/x": noise(100_000, 2)},
]
PREFIX = "../../../state/layers"


def settings(**kw: object) -> LayerSettings:
    base: dict[str, object] = {
        "prefetch_landmark": False,
        "prefetch_background": True,
        "readahead_bytes": 0,
        "quiet_period_s": 0.0,
        # Background fetches start at once, without waiting for a first read.
        "background_unread_wait_s": 0.0,
    }
    return LayerSettings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add(make_image(REF, FILES))
    return reg


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ChunkStore]:
    s = ChunkStore(tmp_path / "chunks", 10 << 20)
    await s.open()
    yield s
    await s.close()


class Setup:
    def __init__(self, registry: FakeRegistry, store: ChunkStore, root: Path) -> None:
        self.registry = registry
        self.store = store
        self.root = root
        self.meta = FakeMetadata()
        self.invalidated: list[Layer] = []
        self.removed: list[str] = []

    async def manager(self, **kw: object) -> LayerManager:
        m = LayerManager(
            self.registry,
            self.store,
            self.meta,
            settings(**kw),
            layer_dirs=LayerDirs(self.root),
            space=self.store,
            link_prefix=PREFIX,
        )
        m.on_materialized = self.invalidated.append
        m.on_unmaterialized = self.removed.append
        await m.load_state()
        return m


@pytest.fixture
def setup(registry: FakeRegistry, store: ChunkStore, tmp_path: Path) -> Setup:
    return Setup(registry, store, tmp_path / "layers")


async def wait_for(what: str, check: object, timeout_s: float = 10.0) -> None:
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def states(m: LayerManager) -> list[str]:
    return sorted(la["materialized"] for la in m.status()["layers"])


async def layers_of(m: LayerManager, registry: FakeRegistry) -> list[Layer]:
    img = registry.images[REF]
    return [await m.get_layer(REF, la.blob_digest) for la in img.layers]


async def test_a_complete_layer_becomes_a_symlink_to_its_directory(setup: Setup) -> None:
    m = await setup.manager()
    try:
        layers = await layers_of(m, setup.registry)
        await wait_for("both layers materialised", lambda: states(m) == ["yes", "yes"])
        for layer, files in zip(layers, FILES, strict=True):
            key = layer_key(layer.index.toc_digest)
            assert layer.diff_link == f"{PREFIX}/{key}/diff"
            tree = setup.root / key / "diff"
            assert layer.local_tree == tree
            for path, data in files.items():
                assert (tree / path).read_bytes() == data
        assert sorted(id(la) for la in setup.invalidated) == sorted(id(la) for la in layers)
        # The directories hold their bytes in the chunk store's budget.
        total = sum(len(d) for files in FILES for d in files.values())
        assert setup.store.stats()["outside_bytes"] == total
        assert all(la["local_bytes"] > 0 for la in m.status()["layers"])
        # Reads of a materialised layer (a container started before) come from the tree.
        node = layers[0].index.find("bin/big")
        assert node is not None
        assert await m.read(layers[0], node, 1000, 10) == FILES[0]["bin/big"][1000:1010]
        assert m.status()["materialize"]["local_reads"] == 1
    finally:
        await m.close()


async def test_a_restart_answers_at_once_and_rebuilds_a_damaged_directory(
    setup: Setup,
) -> None:
    m = await setup.manager()
    try:
        layers = await layers_of(m, setup.registry)
        await wait_for("materialised", lambda: states(m) == ["yes", "yes"])
        keys = [layer_key(la.index.toc_digest) for la in layers]
    finally:
        await m.close()
    built_ns = [(setup.root / k / "record").stat().st_mtime_ns for k in keys]
    # A crash mid-build leaves a directory in tmp/; a damaged one fails its check.
    (setup.root / "tmp" / f"{keys[0]}.dead" / "diff").mkdir(parents=True)
    os.truncate(setup.root / keys[1] / "diff" / "usr/lib/x", 10)

    m2 = await setup.manager()
    try:
        assert not list((setup.root / "tmp").iterdir())
        assert not (setup.root / keys[1]).exists()  # removed, not trusted
        first, second = await layers_of(m2, setup.registry)
        assert first.from_metadata and first.diff_link is not None  # at once
        assert (setup.root / keys[0] / "record").stat().st_mtime_ns == built_ns[0]
        # The damaged one is built again from the stored chunks, no registry request.
        calls = len(setup.registry.range_calls)
        await wait_for("rebuilt", lambda: second.diff_link is not None)
        assert (setup.root / keys[1] / "diff" / "usr/lib/x").read_bytes() == FILES[1]["usr/lib/x"]
        assert len(setup.registry.range_calls) == calls
    finally:
        await m2.close()


async def test_no_room_leaves_the_layer_on_fuse(tmp_path: Path) -> None:
    """A budget that holds a layer's chunks but not its directory as well: the layer stays
    on FUSE (its chunks, the extraction's source, are never evicted for it)."""
    registry = FakeRegistry()
    registry.add(make_image(REF, [FILES[1]]))
    store = ChunkStore(tmp_path / "chunks", 150_000)
    await store.open()
    s = Setup(registry, store, tmp_path / "layers")
    m = await s.manager()
    try:
        (layer,) = await layers_of(m, registry)
        m.use(layer)
        await wait_for("a decision", lambda: states(m) == ["no room"])
        assert layer.diff_link is None and s.invalidated == []
        assert store.stats()["outside_bytes"] == 0
        assert store.has(layer.index.chunks(layer.index.find("usr/lib/x") or 0)[0].digest)
        assert not any(s.root.glob("*/diff"))
    finally:
        await m.close()
        await store.close()


async def test_materialize_false_keeps_every_layer_on_fuse(setup: Setup) -> None:
    m = await setup.manager(materialize=False)
    try:
        layers = await layers_of(m, setup.registry)
        await wait_for(
            "background fetches done",
            lambda: all(la.background_state == "done" for la in layers),
        )
        await asyncio.sleep(0.05)
        assert states(m) == ["disabled", "disabled"]
        assert all(la.diff_link is None for la in layers)
        assert not setup.root.exists() or not any(setup.root.glob("*/diff"))
        assert setup.invalidated == []
    finally:
        await m.close()


async def test_a_released_layer_s_directory_goes_first_when_room_is_needed(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    """Only a directory whose layer this process saw released (use count zero, grace
    passed) is removed to make room for another; one in use stays."""
    other = "registry.example/c/d:1"
    registry.add(make_image(other, [{"opt/y": noise(200_000, 3)}]))
    # Layer 0 holds 262 150 bytes of files, layer 1 100 000, the newcomer 200 000: once
    # the first two are directories, the newcomer's chunks and directory fit only if
    # one directory goes.
    store = ChunkStore(tmp_path / "chunks", 700_000)
    await store.open()
    s = Setup(registry, store, tmp_path / "layers")
    m = await s.manager(release_grace_s=0.05)
    try:
        img = registry.images[REF]
        gone = await m.get_layer(REF, img.layers[0].blob_digest)
        m.use(gone)
        kept = await m.get_layer(REF, img.layers[1].blob_digest)
        m.use(kept)  # in use: its directory must stay
        await wait_for("materialised", lambda: states(m) == ["yes", "yes"])
        m.release(gone)
        await wait_for("released layer dropped", lambda: gone not in m.layers())
        newcomer = await m.get_layer(other, registry.images[other].layers[0].blob_digest)
        m.use(newcomer)
        await wait_for("newcomer materialised", lambda: newcomer.diff_link is not None)
        assert not (s.root / layer_key(gone.index.toc_digest)).exists()
        assert (s.root / layer_key(kept.index.toc_digest) / "diff" / "usr/lib/x").exists()
        st = store.stats()
        assert st["bytes"] + st["outside_bytes"] <= 700_000
        assert st["outside_bytes"] == 100_000 + 200_000
        assert m.status()["materialize"]["removed"] == 1
        assert s.removed == [gone.index.toc_digest]  # its cached diff entries go too
    finally:
        await m.close()
        await store.close()
