"""``alsd convert`` against the real docker-registry, run as a real subprocess; the result
is checked blob by blob, by ``alsd inspect``, and by running it under plain podman."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from alsd.config import RegistrySettings
from alsd.oci import formats
from alsd.oci.estargz_writer import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from alsd.oci.layer_index import LayerIndex
from alsd.oci.manifest import OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Platform
from alsd.oci.reference import parse_reference
from alsd.registry.client import RegistryClient
from alsd.registry.push import Pusher
from alsd.registry.regconf import parse_registries_conf_text
from alsd.tools.inspect import describe_blob
from tests.support.podman import PodmanFactory
from tests.support.registry import (
    RegistryServer,
    fixture_blob_path,
    fixture_manifest,
    free_port,
)

pytest_plugins = ["tests.support.registry", "tests.support.podman"]

pytestmark = pytest.mark.registry


def cli_env(tmp_path: Path, registries_conf: Path, auth_file: Path | None = None) -> dict[str, str]:
    """An environment that sees only test-owned registries.conf and credentials."""
    env = dict(os.environ)
    env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
    env["HOME"] = str(tmp_path / "home")
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "xdg-run")
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("DOCKER_CONFIG", None)
    if auth_file is not None:
        env["REGISTRY_AUTH_FILE"] = str(auth_file)
    else:
        env.pop("REGISTRY_AUTH_FILE", None)
    return env


def alsd(
    *args: str, tmp_path: Path, env: dict[str, str], config: str = ""
) -> subprocess.CompletedProcess[str]:
    cmd, *rest = args
    if cmd == "convert":
        cfg = tmp_path / "alsd.toml"
        cfg.write_text(config)  # never the machine's /etc/alsd.toml
        rest += ["--config", str(cfg)]
    return subprocess.run(
        [sys.executable, "-m", "alsd", cmd, *rest],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def client(server: RegistryServer) -> RegistryClient:
    conf = parse_registries_conf_text(
        f'[[registry]]\nlocation = "{server.address}"\ninsecure = true\n'
    )
    return RegistryClient(
        RegistrySettings(max_retries=1, backoff_min_s=0.01, deadline_s=60),
        registries=conf,
        platform=Platform("linux", "amd64"),
    )


def parse_index(blob: bytes, annotations: dict[str, str]) -> LayerIndex:
    loc = formats.detect(blob[-formats.TAIL_SIZE :], len(blob), annotations, OCI_LAYER_GZIP)
    return formats.parse_toc(
        loc, blob[loc.offset : loc.offset + loc.length], len(blob), annotations
    )


async def check_converted(server: RegistryServer, ref: str) -> list[tuple[bytes, LayerIndex]]:
    """Every layer of ``ref`` is a complete, verified eStargz blob with the right annotations,
    and the config's diff_ids are the digests of the uncompressed blobs."""
    out = []
    async with client(server) as c:
        img = await c.resolve(ref)
        assert img.manifest.media_type == OCI_MANIFEST
        assert json.loads(img.manifest_bytes)["config"]["mediaType"] == (
            "application/vnd.oci.image.config.v1+json"
        )
        assert len(img.config.diff_ids) == len(img.manifest.layers)
        for desc, diff_id in zip(img.manifest.layers, img.config.diff_ids, strict=True):
            blob = b"".join([p async for p in c.read_blob(ref, desc.digest)])
            assert desc.media_type == OCI_LAYER_GZIP
            ann = dict(desc.annotations)
            raw = gzip.decompress(blob)
            assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
            assert ann[UNCOMPRESSED_SIZE_ANNOTATION] == str(len(raw))
            # describe_blob decodes and verifies every chunk against the TOC.
            d = describe_blob(blob, ann, desc.media_type)
            assert d["format"] == "estargz" and d["verified"] is True
            assert d["toc_digest"] == ann[TOC_DIGEST_ANNOTATION]
            out.append((blob, parse_index(blob, ann)))
    return out


def inspect_json(ref: str, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    r = alsd("inspect", "--json", ref, tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


@pytest.mark.podman
async def test_convert_gzip_runs_under_plain_podman(
    registry: RegistryServer, fixtures: object, tmp_path: Path, podman_env: PodmanFactory
) -> None:
    src = registry.push_fixture("gzip")
    dst = f"{registry.address}/converted:gzip"
    env = cli_env(tmp_path, registry.write_registries_conf(tmp_path / "registries.conf"))
    r = alsd("convert", src, dst, tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(dst + "@sha256:")
    # Progress: a line per layer, converted.
    assert "layer 1/2" in r.stderr and "layer 2/2" in r.stderr and "eStargz" in r.stderr

    layers = await check_converted(registry, dst)
    assert len(layers) == 2
    # No --prioritize: every layer says "no prefetch" the way ctr-remote does.
    assert [ix.prefetch for _, ix in layers] == ["none", "none"]

    out = inspect_json(dst, tmp_path, env)
    assert out["manifest_digest"] == r.stdout.strip().partition("@")[2]
    assert [(x["format"], x["verified"]) for x in out["layers"]] == [("estargz", True)] * 2

    podman = podman_env("host")  # no additional layer store: plain podman
    run = podman.run("run", "--rm", dst)
    assert run.stdout == "hello from a fixture\n"


async def test_convert_with_prioritize_puts_a_landmark(
    registry: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    src = registry.push_fixture("gzip")
    dst = f"{registry.address}/converted:prio"
    env = cli_env(tmp_path, registry.write_registries_conf(tmp_path / "registries.conf"))
    lst = tmp_path / "prio.txt"
    lst.write_text("# record file\n/data/dir/deep/file.txt\n")
    r = alsd(
        "convert", src, dst, "--prioritize", "data/small.txt", "--prioritize-from", str(lst),
        "--chunk-size", "65536", tmp_path=tmp_path, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (_, index), _ = await check_converted(registry, dst)
    assert index.prefetch == "landmark" and index.prefetch_end > 0
    for path in ("data/small.txt", "data/dir/deep/file.txt"):
        node = index.find(path)
        assert node is not None
        assert all(ch.fetch_end <= index.prefetch_end for ch in index.chunks(node))
    # The big file is not prioritised, lies after the landmark, and was cut in 64 KiB chunks.
    big = index.find("data/big.bin")
    assert big is not None
    chunks = index.chunks(big)
    assert len(chunks) == -(-300_000 // 65536)
    assert all(ch.blob_offset >= index.prefetch_end for ch in chunks)
    out = inspect_json(dst, tmp_path, env)
    assert out["layers"][0]["prefetch"] == "landmark"


async def test_convert_estargz_copies_layers_as_is(
    registry: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    src = registry.push_fixture("esgz")
    dst = f"{registry.address}/converted:esgz"
    env = cli_env(tmp_path, registry.write_registries_conf(tmp_path / "registries.conf"))
    r = alsd("convert", src, dst, tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("already eStargz") == 2 and "mounted" in r.stderr
    _, body = fixture_manifest("esgz")
    want = [x["digest"] for x in json.loads(body)["layers"]]
    async with client(registry) as c:
        img = await c.resolve(dst)
        src_img = await c.resolve(src)
    assert [x.digest for x in img.manifest.layers] == want
    assert img.config.diff_ids == src_img.config.diff_ids
    await check_converted(registry, dst)


@pytest.mark.parametrize("tag", ["zstdchunked-podman43", "zstdchunked-podman54"])
async def test_convert_zstd_chunked(
    registry: RegistryServer, fixtures: object, tmp_path: Path, tag: str
) -> None:
    src = registry.push_fixture(tag)
    dst = f"{registry.address}/converted:{tag}"
    env = cli_env(tmp_path, registry.write_registries_conf(tmp_path / "registries.conf"))
    r = alsd("convert", src, dst, tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "already eStargz" not in r.stderr
    (_, first), (_, second) = await check_converted(registry, dst)
    for index, path, size in (
        (first, "data/small.txt", len("hello from a fixture\n")),
        (first, "data/big.bin", 300_000),
        (second, "data/added.txt", None),
    ):
        node = index.find(path)
        assert node is not None, path
        assert size is None or index.attr(node).size == size


async def test_convert_index_keeps_platforms(
    registry: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    # An index over the gzip image, pushed with alsd's own pusher.
    ref = parse_reference(f"{registry.address}/multi:src")
    digest, body = fixture_manifest("gzip")
    doc = json.loads(body)
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": doc["mediaType"], "digest": digest, "size": len(body),
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    }).encode()  # fmt: skip
    async with client(registry) as c:
        p = Pusher(c)
        for desc in [doc["config"], *doc["layers"]]:
            await p.push_blob(ref, desc["digest"], fixture_blob_path(desc["digest"]).read_bytes())
        await p.push_manifest(ref, body, doc["mediaType"], tag="gzip")
        await p.push_index(ref, index, OCI_INDEX)

    dst = f"{registry.address}/multi:converted"
    env = cli_env(tmp_path, registry.write_registries_conf(tmp_path / "registries.conf"))
    r = alsd("convert", str(ref), dst, tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    async with client(registry) as c:
        got = await Pusher(c).get_manifest(parse_reference(dst))
        img = await c.resolve(dst)
    new_index = json.loads(got.body)
    assert new_index["mediaType"] == OCI_INDEX
    assert [m["platform"] for m in new_index["manifests"]] == [
        {"os": "linux", "architecture": "amd64"}
    ]
    assert img.index_digest == got.digest == r.stdout.strip().partition("@")[2]
    await check_converted(registry, f"{registry.address}/multi@{img.manifest_digest}")


async def test_convert_with_htpasswd_credentials(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    src = registry_htpasswd.push_fixture("gzip")
    dst = f"{registry_htpasswd.address}/converted:auth"
    auth = registry_htpasswd.write_auth_json(tmp_path / "auth.json")
    env = cli_env(tmp_path, registry_htpasswd.write_registries_conf(tmp_path / "reg.conf"), auth)
    r = alsd("convert", src, dst, tmp_path=tmp_path, env=env)
    assert r.returncode == 0, r.stderr


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_convert_missing_image(registry: RegistryServer, tmp_path: Path) -> None:
    env = cli_env(tmp_path, registry.write_registries_conf(tmp_path / "registries.conf"))
    src = f"{registry.address}/nothing:here"
    r = alsd("convert", src, f"{registry.address}/x:y", tmp_path=tmp_path, env=env)
    assert_one_line_error(r, src, registry.address, "404")


def test_convert_unauthorized(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    src = registry_htpasswd.push_fixture("gzip")
    empty = tmp_path / "auth.json"
    empty.write_text('{"auths": {}}')
    env = cli_env(tmp_path, registry_htpasswd.write_registries_conf(tmp_path / "r.conf"), empty)
    r = alsd("convert", src, f"{registry_htpasswd.address}/x:y", tmp_path=tmp_path, env=env)
    assert_one_line_error(r, src, registry_htpasswd.address, "credentials")


def test_convert_connection_refused(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{address}"\ninsecure = true\n')
    env = cli_env(tmp_path, conf)
    r = alsd(
        "convert", f"{address}/a:b", f"{address}/c:d",
        tmp_path=tmp_path, env=env, config="[fetch]\nmax_retries = 1\n",
    )  # fmt: skip
    assert_one_line_error(r, f"{address}/a:b", address, "cannot connect")
