"""Mirrors from a test registries.conf, with two real registries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from alsd.config import RegistrySettings
from alsd.errors import NotFound, Unauthorized
from alsd.oci.manifest import Platform
from alsd.registry.client import RegistryClient
from alsd.registry.regconf import load_registries_conf
from tests.support.registry import (
    RegistryServer,
    fixture_blob_path,
    fixture_manifest,
    free_port,
    running_registry,
)

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[RegistryServer]:
    d = tmp_path / "mirror-registry"
    d.mkdir()
    with running_registry(d) as m:
        yield m


def client_from(conf: Path) -> RegistryClient:
    return RegistryClient(
        RegistrySettings(max_retries=0, deadline_s=30),
        registries=load_registries_conf(conf, dropin_dirs=[], env={}),
        platform=Platform("linux", "amd64"),
    )


async def test_mirror_is_tried_first(
    registry: RegistryServer, mirror: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    # The image exists only on the mirror; the reference names the registry.
    mirror.push_fixture("esgz", repo="fx-mirror-only")
    conf = registry.write_registries_conf(tmp_path / "registries.conf", mirrors=(mirror.address,))
    ref = f"{registry.address}/fx-mirror-only:esgz"
    async with client_from(conf) as c:
        img = await c.resolve(ref)
        assert (
            img.endpoint is not None and img.endpoint.mirror and img.endpoint.host == mirror.address
        )
        layer = img.manifest.layers[0]
        local = fixture_blob_path(layer.digest).read_bytes()
        assert await c.read_ranges(ref, layer.digest, [(10, 20)]) == [local[10:20]]
    assert img.manifest_digest == fixture_manifest("esgz")[0]


async def test_dead_mirror_falls_back_to_registry(
    registry: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    ref = registry.push_fixture("esgz")
    dead = f"127.0.0.1:{free_port()}"
    conf = registry.write_registries_conf(tmp_path / "registries.conf", mirrors=(dead,))
    async with client_from(conf) as c:
        img = await c.resolve(ref)
    assert img.endpoint is not None and not img.endpoint.mirror


async def test_missing_everywhere_reports_registry_and_mirror(
    registry: RegistryServer, mirror: RegistryServer, tmp_path: Path
) -> None:
    conf = registry.write_registries_conf(tmp_path / "registries.conf", mirrors=(mirror.address,))
    async with client_from(conf) as c:
        with pytest.raises(NotFound) as exc:
            await c.resolve(f"{registry.address}/nothing:here")
    assert registry.address in str(exc.value) and mirror.address in str(exc.value)


async def test_blocked_registry(registry: RegistryServer, tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{registry.address}"\nblocked = true\n')
    async with client_from(conf) as c:
        with pytest.raises(Unauthorized, match="blocked"):
            await c.resolve(f"{registry.address}/fx:esgz")
