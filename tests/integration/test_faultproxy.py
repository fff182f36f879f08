"""The fault proxy's stalls, trickles and seeded random faults, against the real registry.

The proxy is a test tool (tests/support/faultproxy.py); these checks keep the faults it
claims to inject honest, since the registry-client and benchmark figures rest on them.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.registry import RegistryServer, fixture_blob_path, fixture_manifest

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry


@pytest.fixture
async def proxy(registry: RegistryServer, fixtures: object) -> AsyncIterator[FaultProxy]:
    registry.push_fixture("esgz")
    async with FaultProxy(registry.url) as p:
        yield p


def blob_url(proxy: FaultProxy) -> tuple[str, bytes]:

    _, manifest = fixture_manifest("esgz")
    digest = json.loads(manifest)["layers"][0]["digest"]
    return f"{proxy.url}/v2/fx/blobs/{digest}", fixture_blob_path(digest).read_bytes()


async def read_timed(url: str, **headers: str) -> tuple[int, bytes, list[float]]:
    """(status, body, arrival time of each piece)."""
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        body = bytearray()
        times = []
        async for piece in r.content.iter_any():
            body += piece
            times.append(time.monotonic())
        return r.status, bytes(body), times


async def test_a_timed_stall_sends_nothing_for_that_long_then_the_rest(proxy: FaultProxy) -> None:
    url, want = blob_url(proxy)
    proxy.stall(r"/blobs/", seconds=1.0)
    status, body, times = await read_timed(url)
    assert status == 200 and body == want
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) >= 1.0, gaps
    assert proxy.injected["stall"] == 1


async def test_a_trickle_paces_the_body(proxy: FaultProxy) -> None:
    url, want = blob_url(proxy)
    proxy.trickle(r"/blobs/", bytes_per_s=len(want) * 2)  # about half a second
    t0 = time.monotonic()
    status, body, _ = await read_timed(url)
    assert status == 200 and body == want
    assert time.monotonic() - t0 >= 0.45
    assert proxy.injected["trickle"] == 1


async def test_random_faults_are_a_seeded_fraction_of_one_clients_requests(
    registry: RegistryServer, proxy: FaultProxy
) -> None:
    kinds = ("503", "truncate")

    async def draws(p: FaultProxy) -> list[str | None]:
        url, _ = blob_url(p)
        p.random_faults(0.5, kinds, seed=7, user_agent="victim", stall_s=0.1)
        async with aiohttp.ClientSession() as s:
            for agent in ["bystander"] * 5 + ["victim"] * 40:
                try:
                    async with s.get(url, headers={"User-Agent": agent}) as r:
                        await r.read()
                except aiohttp.ClientError:
                    pass  # a truncated body
        return [r.rule for r in p.requests]

    first = await draws(proxy)
    async with FaultProxy(registry.url) as again:
        second = await draws(again)
    assert first == second  # same seed, same faults
    assert first[:5] == [None] * 5  # the other client is never faulted
    faulted = [k for k in first[5:] if k is not None]
    assert 8 <= len(faulted) <= 32 and set(faulted) == {"status", "truncate"}, first
