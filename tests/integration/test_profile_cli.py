"""``alsd profile show|push`` and ``alsd convert --prioritize-profile`` as real subprocesses,
against the real docker-registry, on a state directory a layer manager recorded into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alsd.config import LayerSettings
from alsd.layers.manager import LayerManager
from alsd.oci.profile import LayerProfile, Profile, ProfileEntry, serialize_profile
from alsd.oci.reference import parse_reference
from alsd.registry.referrers import VIA_TAG, ProfileRegistry
from alsd.storage.chunkstore import ChunkStore
from alsd.storage.metadata import MetadataStore
from tests.integration.test_convert import alsd, check_converted, cli_env, client
from tests.support.registry import RegistryServer

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry

READ = ["gone/a", "data/dir/deep/file.txt"]  # not their order in the layer


def config(tmp_path: Path, registries_conf: Path, state: Path) -> Path:
    cfg = tmp_path / "alsd.toml"
    cfg.write_text(f'state_dir = "{state}"\n[registry]\nregistries_conf = "{registries_conf}"\n')
    return cfg


async def record(server: RegistryServer, ref: str, state: Path) -> str:
    """Run a layer manager on ``state`` that reads READ; the layer's digest."""
    async with client(server) as c:
        resolved = await c.resolve(parse_reference(ref))
        store = ChunkStore(state / "chunks", 1 << 30)
        await store.open()
        m = LayerManager(
            c,
            store,
            MetadataStore(state / "metadata"),
            LayerSettings(prefetch_landmark=False, prefetch_background=False, readahead_bytes=0),
        )
        await m.load_state()
        digest = resolved.manifest.layers[0].digest
        layer = await m.get_layer(ref, digest)
        for p in READ:
            node = layer.index.find(p)
            assert node is not None
            await m.read(layer, node, 0, 10)
        await m.close()
        await store.close()
    return digest


async def test_show_push_and_bake(registry: RegistryServer, tmp_path: Path) -> None:
    ref = registry.push_fixture("esgz-noopt", repo="cli/profile")
    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    env = cli_env(tmp_path, conf)
    cfg = config(tmp_path, conf, tmp_path / "state")
    layer = await record(registry, ref, tmp_path / "state")

    r = alsd("profile", "show", "--config", str(cfg), ref, tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["ref"] == ref
    (lp,) = shown["layers"]
    assert lp["digest"] == layer
    assert [e["path"] for e in lp["entries"]] == READ
    assert lp["compressed_bytes"] > 0

    r = alsd("profile", "push", "--config", str(cfg), ref, tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "(referrers tag schema)" in r.stdout
    async with client(registry) as c:
        found = await ProfileRegistry(c).find_profile(parse_reference(ref), shown["digest"])
    assert found is not None and found.via == VIA_TAG
    assert [e.path for e in found.profile.layers[0].entries] == READ

    # Bake it: REF's profile, found in the registry (this config's state has none).
    (tmp_path / "other").mkdir()
    dst = f"{registry.address}/cli/baked:prio"
    r = alsd(
        "convert", ref, dst, "--prioritize-profile", ref, "--chunk-size", "65536",
        tmp_path=tmp_path / "other", env=env,
        config=f'state_dir = "{tmp_path}/empty"\n[registry]\nregistries_conf = "{conf}"\n',
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (_, index), *_ = await check_converted(registry, dst)
    assert index.prefetch == "landmark"
    starts = []
    for p in READ:
        node = index.find(p)
        assert node is not None
        chunks = index.chunks(node)
        assert all(ch.fetch_end <= index.prefetch_end for ch in chunks)
        starts.append(chunks[0].blob_offset)
    # In the profile's order (which is not the layer's tar order).
    assert starts == sorted(starts)


async def test_bake_a_profile_file_and_refuse_a_foreign_one(
    registry: RegistryServer, tmp_path: Path
) -> None:
    src = registry.push_fixture("esgz-noopt", repo="cli/file")
    env = cli_env(tmp_path, registry.write_registries_conf(tmp_path / "registries.conf"))
    async with client(registry) as c:
        layer = (await c.resolve(parse_reference(src))).manifest.layers[0].digest
    prof = tmp_path / "profile.json"
    entries = tuple(ProfileEntry(p, 0, 1) for p in READ)
    prof.write_bytes(serialize_profile(Profile((LayerProfile(layer, entries),))))
    dst = f"{registry.address}/cli/file:baked"
    r = alsd("convert", src, dst, "--prioritize-profile", str(prof), tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    (_, index), *_ = await check_converted(registry, dst)
    assert index.prefetch == "landmark"
    offs = [index.chunks(n)[0].blob_offset for n in
            (index.find(READ[0]), index.find(READ[1])) if n is not None]  # fmt: skip
    assert len(offs) == 2 and offs[0] < offs[1] and offs[1] < index.prefetch_end

    foreign = tmp_path / "foreign.json"
    other = "sha256:" + "e" * 64
    foreign.write_bytes(serialize_profile(Profile((LayerProfile(other, entries),))))
    r = alsd("convert", src, dst, "--prioritize-profile", str(foreign), tmp_path=tmp_path, env=env)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) >= 1
    assert "names none of its layers" in r.stderr.strip().splitlines()[-1]

    bad = tmp_path / "bad.json"
    bad.write_text('{"files": ["bin/sh"]}')
    r = alsd("convert", src, dst, "--prioritize-profile", str(bad), tmp_path=tmp_path, env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("alsd convert: --prioritize-profile")


def test_show_without_a_recording(registry: RegistryServer, tmp_path: Path) -> None:
    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    cfg = config(tmp_path, conf, tmp_path / "state")
    r = alsd("profile", "show", "--config", str(cfg), f"{registry.address}/nothing:here",
             tmp_path=tmp_path, env=cli_env(tmp_path, conf))  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "never run through alsd" in r.stderr
