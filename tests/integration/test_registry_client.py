"""RegistryClient against the real docker-registry: resolve, sizes, ranges, whole blobs."""

from __future__ import annotations

import hashlib
import json

import pytest

from alsd.config import RegistrySettings
from alsd.counters import ByteCounter
from alsd.errors import NotFound, RegistryError, Transient
from alsd.oci.manifest import Platform
from alsd.oci.reference import parse_reference
from alsd.registry.client import RegistryClient
from alsd.registry.regconf import parse_registries_conf_text
from tests.support.registry import (
    RegistryServer,
    fixture_blob_path,
    fixture_manifest,
    free_port,
)

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry

TAGS = ["gzip", "esgz", "esgz-noopt", "zstdchunked-podman43", "zstdchunked-stargz",
        "zstdchunked-podman54"]  # fmt: skip


def insecure(*addresses: str) -> RegistryClient:
    text = "".join(f'[[registry]]\nlocation = "{a}"\ninsecure = true\n' for a in addresses)
    return RegistryClient(
        RegistrySettings(max_retries=2, backoff_min_s=0.01, deadline_s=60),
        registries=parse_registries_conf_text(text),
        platform=Platform("linux", "amd64"),
    )


@pytest.mark.parametrize("tag", TAGS)
async def test_resolve_every_fixture_tag(
    registry: RegistryServer, fixtures: object, tag: str
) -> None:
    ref = registry.push_fixture(tag)
    want_digest, want_bytes = fixture_manifest(tag)
    async with insecure(registry.address) as client:
        counter = ByteCounter()
        img = await client.resolve(ref, counter=counter)
    assert img.manifest_digest == want_digest
    assert img.manifest_bytes == want_bytes
    assert img.index_digest is None
    doc = json.loads(want_bytes)
    assert [layer.digest for layer in img.manifest.layers] == [x["digest"] for x in doc["layers"]]
    assert len(img.config.diff_ids) == len(img.manifest.layers)
    assert img.config_bytes == fixture_blob_path(img.manifest.config.digest).read_bytes()
    # Manifest and config bytes, and nothing else, were read.
    assert counter.bytes == len(want_bytes) + len(img.config_bytes)


async def test_resolve_by_digest_and_tag_with_digest(
    registry: RegistryServer, fixtures: object
) -> None:
    registry.push_fixture("esgz")
    digest, _ = fixture_manifest("esgz")
    async with insecure(registry.address) as client:
        a = await client.resolve(f"{registry.address}/fx@{digest}")
        b = await client.resolve(f"{registry.address}/fx:whatever@{digest}")
    assert a.manifest_digest == b.manifest_digest == digest


async def test_blob_size_ranges_and_whole_blob(registry: RegistryServer, fixtures: object) -> None:
    ref = registry.push_fixture("esgz")
    async with insecure(registry.address) as client:
        img = await client.resolve(ref)
        layer = img.manifest.layers[0]
        local = fixture_blob_path(layer.digest).read_bytes()
        assert await client.blob_size(ref, layer.digest) == layer.size == len(local)

        # Several disjoint ranges (one multipart/byteranges answer), given out of order,
        # one overlapping another, and the footer.
        wanted = [
            (5000, 6000),
            (0, 10),
            (100_000, 100_500),
            (5500, 7000),
            (len(local) - 51, len(local)),
        ]
        counter = ByteCounter()
        got = await client.read_ranges(ref, layer.digest, wanted, counter=counter)
        assert got == [local[s:e] for s, e in wanted]
        assert counter.requests == 1
        assert sum(e - s for s, e in wanted) <= counter.bytes < 10_000

        single = await client.read_ranges(ref, layer.digest, [(1, 2)])
        assert single == [local[1:2]]

        parent = ByteCounter()
        child = ByteCounter(parent)
        h = hashlib.sha256()
        async for chunk in client.read_blob(ref, layer.digest, counter=child):
            h.update(chunk)
        assert "sha256:" + h.hexdigest() == layer.digest
        assert parent.bytes == child.bytes >= len(local)


async def test_not_found_names_reference_and_host(
    registry: RegistryServer, fixtures: object
) -> None:
    ref = registry.push_fixture("esgz")
    async with insecure(registry.address) as client:
        with pytest.raises(NotFound) as exc:
            await client.resolve(f"{registry.address}/fx:no-such-tag")
        assert "fx:no-such-tag" in str(exc.value) and registry.address in str(exc.value)
        assert "404" in str(exc.value)
        with pytest.raises(NotFound, match="blob sha256:0000"):
            await client.blob_size(ref, "sha256:" + "0" * 64)
        with pytest.raises(NotFound):
            await client.read_ranges(ref, "sha256:" + "0" * 64, [(0, 1)])
        with pytest.raises(NotFound):
            await client.resolve(f"{registry.address}/no/such/repo:latest")


async def test_connection_refused_is_transient_and_bounded() -> None:
    port = free_port()  # nothing listens there
    async with insecure(f"127.0.0.1:{port}") as client:
        with pytest.raises(Transient) as exc:
            await client.resolve(f"127.0.0.1:{port}/fx:x")
    assert f"127.0.0.1:{port}" in str(exc.value)
    assert "gave up after 2 retries" in str(exc.value)


async def test_unknown_host_is_not_retried() -> None:
    async with insecure("no-such-host.invalid") as client:
        with pytest.raises(RegistryError) as exc:
            await client.resolve("no-such-host.invalid/fx:x")
    assert not isinstance(exc.value, Transient)
    assert "no-such-host.invalid" in str(exc.value)


async def test_reference_is_parsed_and_closed_client_refuses(
    registry: RegistryServer, fixtures: object
) -> None:
    ref = parse_reference(registry.push_fixture("gzip"))
    client = insecure(registry.address)
    img = await client.resolve(ref)
    assert img.reference == ref
    await client.close()
    with pytest.raises(RegistryError, match="closed"):
        await client.resolve(ref)
