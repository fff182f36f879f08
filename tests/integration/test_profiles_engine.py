"""Prefetch profiles in the layer manager, against the real docker-registry (tag schema):
a run records what it reads; the next cold start on this host, or on a fresh host that
finds the profile in the registry, fetches those chunks before any read; hostile
profiles are ignored with one log line each and never change what a file contains."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from alsd.app.wiring import profile_lookup
from alsd.config import LayerSettings
from alsd.layers.manager import LayerManager
from alsd.layers.model import Layer
from alsd.oci.profile import (
    LayerProfile,
    Profile,
    ProfileEntry,
    profile_chunks,
    serialize_profile,
)
from alsd.oci.reference import parse_reference
from alsd.registry.client import RegistryClient
from alsd.registry.push import Pusher
from alsd.registry.referrers import push_profile
from alsd.registry.regconf import RegistriesConf, RegistryEntry
from alsd.storage.chunkstore import ChunkStore
from alsd.storage.metadata import MetadataStore
from tests.support.registry import RegistryServer

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry

TAG = "esgz-noopt"


def _client(address: str) -> RegistryClient:
    conf = RegistriesConf(registries=(RegistryEntry(address, address, insecure=True),))
    return RegistryClient(registries=conf)


class Managers:
    def __init__(self, address: str) -> None:
        self.address = address
        self.open: list[tuple[LayerManager, ChunkStore, RegistryClient]] = []

    async def make(
        self, meta: Path, chunks: Path, *, lookup: bool = False, **settings: object
    ) -> tuple[LayerManager, ChunkStore, RegistryClient]:
        # Only the profile fetches ahead of the reads: no landmark, background, read-ahead.
        settings.setdefault("prefetch_landmark", False)
        settings.setdefault("prefetch_background", False)
        settings.setdefault("readahead_bytes", 0)
        settings.setdefault("record_window_s", 30.0)
        store = ChunkStore(chunks, 1 << 30)
        await store.open()
        client = _client(self.address)
        m = LayerManager(
            client, store, MetadataStore(meta), LayerSettings(**settings),  # type: ignore[arg-type]
            profile_lookup=profile_lookup(client) if lookup else None,
        )  # fmt: skip
        await m.load_state()
        self.open.append((m, store, client))
        return m, store, client

    async def close(self, m: LayerManager) -> None:
        for entry in list(self.open):
            if entry[0] is m:
                self.open.remove(entry)
                await m.close()
                await entry[1].close()
                await entry[2].close()


@pytest.fixture
async def managers(registry: RegistryServer) -> AsyncIterator[Managers]:
    ms = Managers(registry.address)
    yield ms
    for m, _, _ in list(ms.open):
        await ms.close(m)


async def _until(pred: object, what: str, timeout_s: float = 30) -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling interval


def _files(layer: Layer, n: int) -> list[str]:
    """``n`` regular non-empty files of the layer, last ones of the blob first (not tar
    order, so that prefetching them in profile order is visible)."""
    seen: dict[str, None] = {}
    for node, _ in reversed(list(layer.index.iter_chunks())):
        if layer.index.attr(node).size > 0:
            seen.setdefault(layer.index.path(node), None)
    out = list(seen)[:n]
    assert len(out) == n
    return out


async def _read(m: LayerManager, layer: Layer, path: str) -> bytes:
    node = layer.index.find(path)
    assert node is not None
    return await m.read(layer, node, 0, layer.index.attr(node).size)


async def _first_layer(m: LayerManager, client: RegistryClient, ref: str) -> Layer:
    resolved = await client.resolve(parse_reference(ref))
    return await m.get_layer(ref, resolved.manifest.layers[0].digest)


async def test_recorded_run_is_prefetched_at_the_next_cold_start(
    registry: RegistryServer, managers: Managers, tmp_path: Path
) -> None:
    ref = registry.push_fixture(TAG, repo="prof/local")
    m1, _, c1 = await managers.make(tmp_path / "meta", tmp_path / "chunks1")
    layer = await _first_layer(m1, c1, ref)
    paths = _files(layer, 3)
    want = {p: await _read(m1, layer, p) for p in paths}
    await managers.close(m1)  # merges and saves the recording

    # The next cold start on this host: same metadata, the chunks gone.
    m2, store2, c2 = await managers.make(tmp_path / "meta", tmp_path / "chunks2")
    layer2 = await _first_layer(m2, c2, ref)
    await _until(lambda: layer2.profile_state == "done", "the profile prefetch")
    stored = m2.profiles.stored(layer2.image_digest)
    assert stored is not None
    lp = stored.layer(layer2.blob_digest)
    assert lp is not None and [e.path for e in lp.entries] == paths
    chunks = profile_chunks(layer2.index, lp.entries)
    assert chunks and all(store2.has(c.digest) for _, c in chunks)
    assert layer2.profile_entries == 3 and layer2.profile_bytes > 0
    fetched = layer2.stats.bytes_fetched
    assert fetched > 0
    # The reads are served from the store: nothing more is fetched, and the bytes are right.
    for p in paths:
        assert await _read(m2, layer2, p) == want[p]
    assert layer2.stats.bytes_fetched == fetched
    # The status shows it.
    st = next(x for x in m2.status()["layers"] if x["digest"] == layer2.blob_digest)
    assert st["profile"] == "done" and st["profile_bytes"] == layer2.profile_bytes


async def test_profile_off_prefetches_nothing(
    registry: RegistryServer, managers: Managers, tmp_path: Path
) -> None:
    ref = registry.push_fixture(TAG, repo="prof/off")
    m1, _, c1 = await managers.make(tmp_path / "meta", tmp_path / "chunks1")
    layer = await _first_layer(m1, c1, ref)
    for p in _files(layer, 2):
        await _read(m1, layer, p)
    await managers.close(m1)
    m2, _, c2 = await managers.make(tmp_path / "meta", tmp_path / "chunks2", profiles_use=False)
    layer2 = await _first_layer(m2, c2, ref)
    await _until(lambda: layer2.profile_state == "disabled", "the prefetch to start")
    await asyncio.sleep(0.2)
    assert layer2.stats.bytes_fetched == 0


async def test_registry_profile_on_a_fresh_host(
    registry: RegistryServer, managers: Managers, tmp_path: Path
) -> None:
    ref = registry.push_fixture(TAG, repo="prof/shared")
    async with _client(registry.address) as c:
        r = parse_reference(ref)
        resolved = await c.resolve(r)
        # Learn on "host A": record a run.
        m1, _, c1 = await managers.make(tmp_path / "a-meta", tmp_path / "a-chunks")
        layer = await _first_layer(m1, c1, ref)
        paths = _files(layer, 2)
        want = {p: await _read(m1, layer, p) for p in paths}
        await managers.close(m1)
        m1b, _, _ = await managers.make(tmp_path / "a-meta", tmp_path / "a-chunks")
        profile = m1b.profiles.stored(resolved.manifest_digest)
        assert profile is not None
        await managers.close(m1b)
        await push_profile(
            Pusher(c), r, subject_media_type=resolved.manifest.media_type,
            subject_digest=resolved.manifest_digest,
            subject_size=len(resolved.manifest_bytes),
            profile_blob=serialize_profile(profile), created="2026-12-02T00:00:00Z",
        )  # fmt: skip
    # "Host B": fresh state, finds the profile in the registry (tag schema).
    m2, store2, c2 = await managers.make(tmp_path / "b-meta", tmp_path / "b-chunks", lookup=True)
    layer2 = await _first_layer(m2, c2, ref)
    await _until(lambda: layer2.profile_state == "done", "the profile prefetch")
    assert m2.profiles.stats.lookups_found == 1
    lp = profile.layer(layer2.blob_digest)
    assert lp is not None
    assert all(store2.has(c.digest) for _, c in profile_chunks(layer2.index, lp.entries))
    fetched = layer2.stats.bytes_fetched
    for p in paths:
        assert await _read(m2, layer2, p) == want[p]
    assert layer2.stats.bytes_fetched == fetched


async def test_missing_profile_is_looked_up_once(
    registry: RegistryServer, managers: Managers, tmp_path: Path
) -> None:
    ref = registry.push_fixture(TAG, repo="prof/none")
    m, _, c = await managers.make(tmp_path / "meta", tmp_path / "chunks", lookup=True)
    layer = await _first_layer(m, c, ref)
    await _until(lambda: layer.profile_state == "none", "the profile lookup")
    assert m.profiles.stats.lookups == 1 and m.profiles.stats.lookups_found == 0
    # Another lookup of the image (e.g. after the layer was dropped) does not ask again.
    m.profiles.start_lookup(ref, layer.image_digest, [layer.blob_digest])
    assert m.profiles.stats.lookups == 1


@pytest.mark.parametrize("kind", ["names not in the TOC", "another image's layer"])
async def test_hostile_registry_profile_is_ignored_with_one_line(
    registry: RegistryServer,
    managers: Managers,
    tmp_path: Path,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref = registry.push_fixture(TAG, repo=f"prof/hostile-{kind.split()[0]}")
    r = parse_reference(ref)
    async with _client(registry.address) as c:
        resolved = await c.resolve(r)
        layer_digest = resolved.manifest.layers[0].digest
        if kind == "names not in the TOC":
            entries = tuple(ProfileEntry(f"no/such/file{i}", 0, 100) for i in range(50))
            profile = Profile((LayerProfile(layer_digest, entries),))
        else:
            other = "sha256:" + "e" * 64
            profile = Profile((LayerProfile(other, (ProfileEntry("etc/passwd", 0, 10),)),))
        await push_profile(
            Pusher(c), r, subject_media_type=resolved.manifest.media_type,
            subject_digest=resolved.manifest_digest,
            subject_size=len(resolved.manifest_bytes),
            profile_blob=serialize_profile(profile), created="2026-12-02T00:00:00Z",
        )  # fmt: skip
    m, _, c2 = await managers.make(tmp_path / "meta", tmp_path / "chunks", lookup=True)
    with caplog.at_level(logging.WARNING, logger="alsd"):
        layer = await _first_layer(m, c2, ref)
        await _until(lambda: layer.profile_state == "none", "the profile check")
    lines = [rec.getMessage() for rec in caplog.records if "profile" in rec.getMessage()]
    assert len(lines) == 1, lines
    assert ("no regular file" if kind.startswith("names") else "not a layer of this image") in (
        lines[0]
    )
    assert layer.stats.bytes_fetched == 0
    # The layer serves its files as always.
    node = next(n for n, _ in layer.index.iter_chunks())
    data = await m.read(layer, node, 0, layer.index.attr(node).size)
    assert len(data) == layer.index.attr(node).size
    assert json.dumps(m.status()["profiles"])
