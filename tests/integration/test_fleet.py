"""Fleets: nodes that pull through a site-local pull-through cache, or through an HTTP(S)
proxy, and a Prometheus server scraping alsd's metrics.

The pull-through cache is Debian's docker-registry itself with ``proxy: remoteurl:`` in
front of the origin registry, named as a mirror in registries.conf. Requests are counted
by :class:`FaultProxy` instances that only pass them through (no fault is injected here):
one between the cache and the origin (what the origin serves), one between alsd and the
cache, one in front of the origin under the name the image reference uses (alsd must not
go there for blobs while the mirror works).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.daemon import running_alsd
from tests.support.faultproxy import FaultProxy, Recorded
from tests.support.registry import (
    RegistryServer,
    fixture_blob_path,
    fixture_manifest,
    start_registry,
)

pytest_plugins = ["tests.support.registry"]

pytestmark = [pytest.mark.fuse, pytest.mark.registry, pytest.mark.slow]

EXPECTED = b"hello from a fixture\n"


def _layer_file(digest: str, name: str) -> bytes:
    """A file of a fixture layer (eStargz is a valid tar.gz), read with the standard library."""
    with tarfile.open(
        fileobj=io.BytesIO(gzip.decompress(fixture_blob_path(digest).read_bytes()))
    ) as tf:
        for member in tf.getmembers():
            if member.name.lstrip("./") == name:
                f = tf.extractfile(member)
                assert f is not None
                return f.read()
    raise KeyError(name)


def _blob_gets(proxy: FaultProxy, digest: str) -> list[Recorded]:
    return [r for r in proxy.requests_to(f"/blobs/{digest}") if r.method == "GET"]


def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, resp.read()


async def test_pull_through_cache_answers_an_uncached_range_with_the_whole_blob(
    registry: RegistryServer, fixtures: Path, tmp_path: Path
) -> None:
    """What Debian's docker-registry (distribution 2.8) does as a pull-through cache: a
    range request for a blob it has not cached is answered 200 with the whole blob (it
    streams the origin's blob while caching it); once cached, 206 with the range."""
    registry.push_fixture("esgz-noopt")
    digest = fixture_manifest_layers("esgz-noopt")[0]
    whole = fixture_blob_path(digest).read_bytes()
    async with FaultProxy(registry.url) as upstream:
        d = tmp_path / "cache"
        d.mkdir()
        # In a thread: at start the cache asks the origin (through ``upstream``, which
        # runs on this event loop) for its /v2/ before it listens.
        cache = await asyncio.to_thread(start_registry, d, proxy_remote_url=upstream.url)
        try:
            url = f"{cache.url}/v2/fx/blobs/{digest}"
            status, body = await asyncio.to_thread(_get, url, {"Range": "bytes=100-199"})
            assert (status, body) == (200, whole)
            n = len(_blob_gets(upstream, digest))
            print(f"uncached: 200 with {len(body)} bytes; origin GETs: {n}")

            deadline = time.monotonic() + 30
            while True:
                status, body = await asyncio.to_thread(_get, url, {"Range": "bytes=100-199"})
                if status == 206:
                    break
                assert status == 200 and body == whole
                assert time.monotonic() < deadline, "the cache never served a range"
                await asyncio.sleep(0.1)
            assert body == whole[100:200]
        finally:
            cache.stop()


def fixture_manifest_layers(tag: str) -> list[str]:
    _, manifest = fixture_manifest(tag)
    return [la["digest"] for la in json.loads(manifest)["layers"]]


async def test_alsd_through_a_pull_through_cache_mirror(
    registry: RegistryServer, fixtures: Path, tmp_path: Path
) -> None:
    """alsd reads an image through the cache named as a mirror: the cache answers alsd's
    range requests with whole blobs while it has not cached them; alsd takes the bytes it
    asked for from them, serves correct files, and asks the cache for each blob's content
    once, so the origin serves each blob no more often than the cache's own fill needs."""
    registry.push_fixture("esgz")
    layers = fixture_manifest_layers("esgz")
    big = _layer_file(layers[0], "data/big.bin")
    async with (
        FaultProxy(registry.url) as upstream,
        FaultProxy(registry.url) as direct,
    ):
        # A slow origin (~1 s for the 1.4 MB layer): the cache is still filling while
        # alsd reads, as it would be over a WAN, so it keeps answering 200 meanwhile.
        upstream.trickle(r"/blobs/", times=None, bytes_per_s=1_400_000)
        d = tmp_path / "cache"
        d.mkdir()
        cache = await asyncio.to_thread(start_registry, d, proxy_remote_url=upstream.url)
        try:
            async with FaultProxy(cache.url) as front:
                conf = tmp_path / "registries.conf"
                conf.write_text(
                    f'[[registry]]\nlocation = "{direct.address}"\ninsecure = true\n'
                    f'[[registry.mirror]]\nlocation = "{front.address}"\ninsecure = true\n'
                )
                ref = f"{direct.address}/fx:esgz"
                with running_alsd(tmp_path / "alsd", registries_conf=conf) as alsd:
                    diff0 = alsd.layer_dir(ref, layers[0]) / "diff"
                    diff1 = alsd.layer_dir(ref, layers[1]) / "diff"
                    got_big = await asyncio.to_thread((diff0 / "data" / "big.bin").read_bytes)
                    got_small = await asyncio.to_thread((diff0 / "data" / "small.txt").read_bytes)
                    added = await asyncio.to_thread((diff1 / "data" / "added.txt").read_bytes)
                    log = alsd.log()
        finally:
            cache.stop()
    assert got_big == big
    assert got_small == EXPECTED
    assert added == _layer_file(layers[1], "data/added.txt")
    assert not [r for r in direct.requests if "/blobs/" in r.path], direct.requests
    for digest in layers:
        to_cache = _blob_gets(front, digest)
        whole = [r for r in to_cache if r.status == 200]
        print(
            f"{digest[:19]}: alsd->cache {[(r.headers.get('Range'), r.status) for r in to_cache]}, "
            f"cache->origin {len(_blob_gets(upstream, digest))}"
        )
        assert len(whole) <= 1, (to_cache, log[-3000:])
        assert len(_blob_gets(upstream, digest)) <= 2
