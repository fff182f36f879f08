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
import contextlib
import gzip
import io
import json
import os
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.daemon import running_alsd, start_alsd
from tests.support.faultproxy import FaultProxy, Recorded
from tests.support.httpproxy import HttpProxy
from tests.support.registry import (
    RegistryServer,
    fixture_blob_path,
    fixture_manifest,
    free_port,
    running_registry,
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


# ------------------------------------------------------------------ a cache still filling


async def test_a_cache_answering_whole_blobs_is_asked_once_per_blob(
    registry: RegistryServer, fixtures: Path, tmp_path: Path
) -> None:
    """A stand-in for a pull-through cache that is still filling (the real one answers 200
    with the whole blob then, test above; how long it keeps doing so depends on timing that
    cannot be produced reliably): every range request is answered 200 with the whole blob.
    alsd takes what it asked for from the first answer and keeps the rest, so it asks for
    each blob once, however many reads need it."""
    registry.push_fixture("esgz-noopt")
    layers = fixture_manifest_layers("esgz-noopt")
    async with FaultProxy(registry.url) as cache:
        cache.ignore_range(r"/blobs/")
        conf = cache_conf(tmp_path, registry, cache)
        ref = f"{registry.address}/fx:esgz-noopt"
        with running_alsd(tmp_path / "alsd", registries_conf=conf) as alsd:
            diff0 = alsd.layer_dir(ref, layers[0]) / "diff"
            files = ["data/big.bin", "data/small.txt", "data/dir/deep/file.txt", "bin/busybox"]
            got = [await asyncio.to_thread((diff0 / f).read_bytes) for f in files]
            log = alsd.log()
    assert got == [_layer_file(layers[0], f) for f in files]
    gets = _blob_gets(cache, layers[0])
    assert [r.status for r in gets] == [200], (gets, log[-3000:])


def cache_conf(tmp_path: Path, registry: RegistryServer, mirror: FaultProxy) -> Path:
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'[[registry]]\nlocation = "{registry.address}"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{mirror.address}"\ninsecure = true\n'
    )
    return conf


# ------------------------------------------------------------------ HTTP(S) proxies

# Never resolves (.invalid is reserved): only the test proxy knows where it is.
PROXIED_HOST = "registry.alsd.invalid"
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy")


def proxy_env(**values: str) -> dict[str, str]:
    """The proxy variables alsd starts with: exactly these (the others empty)."""
    return {v: values.get(v, "") for v in PROXY_VARS}


def self_signed(d: Path, host: str) -> tuple[Path, Path]:
    cert, key = d / "registry.crt", d / "registry.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={host}",
         "-addext", f"subjectAltName=DNS:{host}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_proxy_from_the_environment(fixtures: Path, tmp_path: Path) -> None:
    """HTTPS_PROXY: alsd reaches a TLS registry through a CONNECT tunnel (the registry's
    name resolves nowhere else), verifying the registry's certificate end to end."""
    (tmp_path / "reg").mkdir()
    cert, key = self_signed(tmp_path, PROXIED_HOST)
    with running_registry(tmp_path / "reg", tls=(cert, key)) as reg:
        reg.push_fixture("esgz")
        layers = fixture_manifest_layers("esgz")
        with HttpProxy({PROXIED_HOST: ("127.0.0.1", reg.port)}) as proxy:
            conf = tmp_path / "registries.conf"
            conf.write_text("")
            ref = f"{PROXIED_HOST}:{reg.port}/fx:esgz"
            env = {**proxy_env(HTTPS_PROXY=proxy.url), "SSL_CERT_FILE": str(cert)}
            with running_alsd(tmp_path / "alsd", registries_conf=conf, env=env) as alsd:
                small = (alsd.layer_dir(ref, layers[0]) / "diff/data/small.txt").read_bytes()
                added = (alsd.layer_dir(ref, layers[1]) / "diff/data/added.txt").read_bytes()
    assert small == EXPECTED
    assert added == _layer_file(layers[1], "data/added.txt")
    assert proxy.requests
    assert {(r.method, r.target) for r in proxy.requests} == {
        ("CONNECT", f"{PROXIED_HOST}:{reg.port}")
    }


def test_http_proxy_lower_case_forwards_plain_http(
    registry: RegistryServer, fixtures: Path, tmp_path: Path
) -> None:
    """http_proxy (lower case, as podman also reads it): requests to a plain-HTTP
    (insecure) registry go to the proxy in absolute form."""
    registry.push_fixture("esgz")
    layers = fixture_manifest_layers("esgz")
    with HttpProxy({PROXIED_HOST: ("127.0.0.1", registry.port)}) as proxy:
        conf = tmp_path / "registries.conf"
        conf.write_text(f'[[registry]]\nlocation = "{PROXIED_HOST}"\ninsecure = true\n')
        ref = f"{PROXIED_HOST}:{registry.port}/fx:esgz"
        env = proxy_env(http_proxy=proxy.url)
        with running_alsd(tmp_path / "alsd", registries_conf=conf, env=env) as alsd:
            small = (alsd.layer_dir(ref, layers[0]) / "diff/data/small.txt").read_bytes()
    assert small == EXPECTED
    base = f"http://{PROXIED_HOST}:{registry.port}/v2/"
    assert proxy.requests and all(r.target.startswith(base) for r in proxy.requests)
    assert any(f"/blobs/{layers[0]}" in r.target for r in proxy.requests)


def test_no_proxy_and_loopback_go_direct(
    registry: RegistryServer, fixtures: Path, tmp_path: Path
) -> None:
    """NO_PROXY names hosts reached directly (here a domain suffix: the registry's name then
    resolves nowhere, so its layers cannot be served), and, as podman (Go) does, loopback
    registries never go through a proxy."""
    registry.push_fixture("esgz")
    layers = fixture_manifest_layers("esgz")
    with HttpProxy({PROXIED_HOST: ("127.0.0.1", registry.port)}) as proxy:
        conf = tmp_path / "registries.conf"
        conf.write_text(
            f'[[registry]]\nlocation = "{PROXIED_HOST}"\ninsecure = true\n'
            f'[[registry]]\nlocation = "{registry.address}"\ninsecure = true\n'
        )
        env = proxy_env(HTTP_PROXY=proxy.url, NO_PROXY="example.org, .alsd.invalid")
        with running_alsd(tmp_path / "alsd", registries_conf=conf, env=env) as alsd:
            direct = f"{PROXIED_HOST}:{registry.port}/fx:esgz"
            with pytest.raises(FileNotFoundError):
                (alsd.layer_dir(direct, layers[0]) / "diff").stat()
            loopback = f"{registry.address}/fx:esgz"
            small = (alsd.layer_dir(loopback, layers[0]) / "diff/data/small.txt").read_bytes()
            log = alsd.log()
    assert small == EXPECTED
    assert proxy.requests == []
    assert f"{direct}: cannot resolve" in log, log[-3000:]


# ------------------------------------------------------------------ metrics over TCP


def _http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (sockets among its fds, LISTEN in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_over_tcp_for_prometheus(tmp_path: Path) -> None:
    port = free_port()
    settings = {"control.metrics_address": f"127.0.0.1:{port}"}
    with running_alsd(tmp_path / "alsd", settings=settings) as alsd:
        status, ctype, body = _http_get(f"http://127.0.0.1:{port}/metrics")
        over_unix = alsd.metrics()
        others = [
            _http_get(f"http://127.0.0.1:{port}{p}")[0] for p in ("/", "/status", "/metrics/x")
        ]
        post = urllib.request.Request(
            f"http://127.0.0.1:{port}/credentials", data=b"{}", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(post, timeout=30)
        listening = _listening_tcp_ports(alsd.proc.pid)
    assert status == 200
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    names = {ln.split()[2] for ln in body.decode().splitlines() if ln.startswith("# TYPE ")}
    assert names and names == {
        ln.split()[2] for ln in over_unix.splitlines() if ln.startswith("# TYPE ")
    }
    assert others == [404, 404, 404]
    assert exc.value.code in (404, 405)
    assert listening == {port}


def test_metrics_listener_is_off_by_default(tmp_path: Path) -> None:
    with running_alsd(tmp_path / "alsd") as alsd:
        assert alsd.metrics()  # the control socket still serves them
        assert _listening_tcp_ports(alsd.proc.pid) == set()


@pytest.mark.parametrize(
    "value", ["9100", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "[::1:9100", ""]
)
def test_bad_metrics_address_names_the_key_and_the_file(tmp_path: Path, value: str) -> None:
    p = start_alsd(tmp_path / "alsd", settings={"control.metrics_address": value}, wait=False)
    rc = p.wait_exit()
    p.cleanup()
    assert rc != 0
    log = p.log()
    assert "metrics_address" in log and str(p.config_path) in log, log[-2000:]
