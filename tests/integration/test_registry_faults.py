"""Faults between the client and the real registry, injected by tests/support/faultproxy.py
(a test-only proxy: these failures cannot be produced with the registry alone)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from alsd.config import RegistrySettings
from alsd.counters import ByteCounter
from alsd.errors import IntegrityError, Transient
from alsd.oci.manifest import Platform
from alsd.registry.authfile import CredentialStore
from alsd.registry.client import RegistryClient
from alsd.registry.regconf import parse_registries_conf_text
from tests.support.faultproxy import FaultProxy
from tests.support.registry import (
    RegistryServer,
    fixture_blob_path,
    fixture_manifest,
)

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry

BLOBS = r"/v2/fx/blobs/"


@pytest.fixture
async def proxy(registry: RegistryServer, fixtures: object) -> AsyncIterator[FaultProxy]:
    registry.push_fixture("esgz")
    async with FaultProxy(registry.url) as p:
        yield p


def make_client(
    *addresses: str, creds: CredentialStore | None = None, **settings: Any
) -> RegistryClient:
    text = "".join(f'[[registry]]\nlocation = "{a}"\ninsecure = true\n' for a in addresses)
    s = dataclasses.replace(
        RegistrySettings(max_retries=3, backoff_min_s=0.01, backoff_max_s=0.05), **settings
    )
    return RegistryClient(
        s,
        registries=parse_registries_conf_text(text),
        credentials=creds,
        platform=Platform("linux", "amd64"),
    )


def esgz_layer() -> tuple[str, bytes]:
    _, manifest = fixture_manifest("esgz")
    digest = json.loads(manifest)["layers"][0]["digest"]
    return digest, fixture_blob_path(digest).read_bytes()


async def test_500_then_success(proxy: FaultProxy) -> None:
    proxy.fail(r"/manifests/", status=500, times=2)
    async with make_client(proxy.address) as c:
        img = await c.resolve(f"{proxy.address}/fx:esgz")
    assert img.manifest_digest == fixture_manifest("esgz")[0]
    assert [r.rule for r in proxy.requests_to("/manifests/")] == ["status", "status", None]


async def test_500_forever_gives_up(proxy: FaultProxy) -> None:
    proxy.fail(r"/manifests/", status=503, times=None)
    async with make_client(proxy.address) as c:
        with pytest.raises(Transient) as exc:
            await c.resolve(f"{proxy.address}/fx:esgz")
    assert "HTTP 503" in str(exc.value) and proxy.address.split(":")[0] in str(exc.value)
    assert "gave up after 3 retries" in str(exc.value)
    assert len(proxy.requests_to("/manifests/")) == 4


async def test_501_is_not_retried(proxy: FaultProxy) -> None:
    proxy.fail(r"/manifests/", status=501, times=None)
    async with make_client(proxy.address) as c:
        with pytest.raises(Exception, match="501"):
            await c.resolve(f"{proxy.address}/fx:esgz")
    assert len(proxy.requests_to("/manifests/")) == 1


async def test_429_retry_after_is_honoured(proxy: FaultProxy) -> None:
    proxy.fail(r"/manifests/", status=429, headers={"Retry-After": "1"})
    async with make_client(proxy.address) as c:
        t0 = time.monotonic()
        await c.resolve(f"{proxy.address}/fx:esgz")
        waited = time.monotonic() - t0
    assert [r.rule for r in proxy.requests_to("/manifests/")] == ["status", None]
    # A lower bound only: the retry cannot have come before Retry-After said so.
    assert waited >= 1.0


async def test_429_retry_after_past_deadline_fails_at_once(proxy: FaultProxy) -> None:
    proxy.fail(r"/manifests/", status=429, headers={"Retry-After": "3600"})
    async with make_client(proxy.address, deadline_s=30) as c:
        with pytest.raises(Transient, match="would pass the deadline") as exc:
            await c.resolve(f"{proxy.address}/fx:esgz")
    assert exc.value.retry_after == 3600
    assert len(proxy.requests_to("/manifests/")) == 1


@pytest.mark.parametrize("fault", ["reset_body", "truncate_body"])
async def test_broken_body_is_retried(proxy: FaultProxy, fault: str) -> None:
    digest, local = esgz_layer()
    getattr(proxy, fault)(BLOBS + digest)
    async with make_client(proxy.address) as c:
        counter = ByteCounter()
        got = await c.read_ranges(
            f"{proxy.address}/fx:esgz", digest, [(0, 200_000)], counter=counter
        )
    assert got == [local[:200_000]]
    assert [r.rule for r in proxy.requests_to(BLOBS)] == [fault.split("_")[0], None]
    # Bytes of the broken attempt count too: they crossed the wire.
    assert counter.bytes > 200_000


async def test_truncated_config_is_retried(proxy: FaultProxy) -> None:
    proxy.truncate_body(BLOBS)
    async with make_client(proxy.address) as c:
        img = await c.resolve(f"{proxy.address}/fx:esgz")
    assert len(img.config.diff_ids) == 2


async def test_stall_past_timeout(proxy: FaultProxy) -> None:
    digest, _ = esgz_layer()
    proxy.stall(BLOBS + digest, times=None)
    # No hedge: this is about the request timeout (hedges: test_registry_slow.py).
    no_hedge = {"hedge_min_s": 60.0, "hedge_max_s": 60.0}
    async with make_client(proxy.address, request_timeout_s=0.5, max_retries=1, **no_hedge) as c:
        with pytest.raises(Transient, match="no answer within") as exc:
            await c.read_ranges(f"{proxy.address}/fx:esgz", digest, [(0, 100_000)])
    assert proxy.address.split(":")[0] in str(exc.value)
    assert len(proxy.requests_to(BLOBS)) == 2


async def test_multirange_400_switches_host_to_single_range(proxy: FaultProxy) -> None:
    digest, local = esgz_layer()
    proxy.reject_multirange()
    wanted = [(0, 10), (50_000, 50_100), (len(local) - 51, len(local))]
    async with make_client(proxy.address) as c:
        ref = f"{proxy.address}/fx:esgz"
        assert await c.read_ranges(ref, digest, wanted) == [local[s:e] for s, e in wanted]
        assert await c.read_ranges(ref, digest, wanted[:2]) == [local[s:e] for s, e in wanted[:2]]
    ranges = [r.headers.get("Range", "") for r in proxy.requests_to(BLOBS)]
    assert "," in ranges[0] and all("," not in r for r in ranges[1:])
    assert len(ranges) == 3  # the rejected one, then one super-range per call


async def test_range_ignored_200_whole_blob(proxy: FaultProxy) -> None:
    digest, local = esgz_layer()
    proxy.ignore_range(BLOBS)
    wanted = [(7, 70), (1000, 1001)]
    async with make_client(proxy.address) as c:
        assert await c.read_ranges(f"{proxy.address}/fx:esgz", digest, wanted) == [
            local[7:70],
            local[1000:1001],
        ]


async def test_corrupt_manifest_by_digest(proxy: FaultProxy) -> None:
    digest, _ = fixture_manifest("esgz")
    proxy.corrupt_body(r"/manifests/", times=None)
    async with make_client(proxy.address) as c:
        with pytest.raises(IntegrityError) as exc:
            await c.resolve(f"{proxy.address}/fx@{digest}")
    assert digest in str(exc.value) and proxy.address in str(exc.value)


async def test_corrupt_config(proxy: FaultProxy) -> None:
    proxy.corrupt_body(BLOBS, times=None)
    async with make_client(proxy.address) as c:
        with pytest.raises(IntegrityError, match="blob from"):
            await c.resolve(f"{proxy.address}/fx:esgz")


async def test_redirect_to_other_host_never_gets_authorization(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    registry_htpasswd.push_fixture("esgz")
    digest, local = esgz_layer()
    basic = (
        "Basic "
        + base64.b64encode(
            f"{registry_htpasswd.username}:{registry_htpasswd.password}".encode()
        ).decode()
    )
    # The storage host authorises by URL (like a pre-signed S3 URL): it adds the
    # registry's credentials itself; the client must not send any. 127.0.0.2 is
    # another host name for the same machine.
    storage_proxy = FaultProxy(
        registry_htpasswd.url, host="127.0.0.2", inject_headers={"Authorization": basic}
    )
    async with storage_proxy as storage, FaultProxy(registry_htpasswd.url) as front:
        front.redirect(BLOBS, storage.url)
        # The first "pre-signed URL" of the layer has expired.
        storage.fail(BLOBS + digest, status=403, times=1)
        auth_json = tmp_path / "auth.json"
        auth_json.write_text(json.dumps({"auths": {front.address: {"auth": basic[6:]}}}))
        async with make_client(front.address, creds=CredentialStore([auth_json])) as c:
            ref = f"{front.address}/fx:esgz"
            img = await c.resolve(ref)
            assert await c.blob_size(ref, digest) == len(local)
            wanted = [(0, 5), (300_000, 300_050)]
            assert await c.read_ranges(ref, digest, wanted) == [local[s:e] for s, e in wanted]
            assert await c.read_ranges(ref, digest, [(9, 10)]) == [local[9:10]]
        assert img.manifest_digest == fixture_manifest("esgz")[0]
        assert storage.requests, "the redirect was not followed"
        assert all("Authorization" not in r.headers for r in storage.requests)
        assert any("Authorization" in r.headers for r in front.requests_to(BLOBS))
        layer_front = front.requests_to(BLOBS + digest)
        layer_storage = storage.requests_to(BLOBS + digest)
        # The 403 from the cached URL made the client ask the registry once more; every
        # later read of the layer went straight to the cached storage URL.
        assert [(r.method, r.rule) for r in layer_front] == [("HEAD", "redirect")] * 2
        assert layer_storage[0].rule == "status"
        assert [r.method for r in layer_storage[1:]].count("GET") >= 2


async def test_blob_size_falls_back_to_ranged_get(proxy: FaultProxy) -> None:
    # Some storage backends refuse HEAD (ghcr's S3): the size then comes from a GET of
    # bytes 0-1 and its Content-Range total.
    digest, local = esgz_layer()
    proxy.fail(BLOBS, status=405, method="HEAD", times=None)
    async with make_client(proxy.address) as c:
        counter = ByteCounter()
        assert await c.blob_size(f"{proxy.address}/fx:esgz", digest, counter=counter) == len(local)
    gets = [r for r in proxy.requests_to(BLOBS + digest) if r.method == "GET"]
    assert [r.headers.get("Range") for r in gets] == ["bytes=0-1"]
    assert counter.bytes < 1000
