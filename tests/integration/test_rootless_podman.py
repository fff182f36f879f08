"""Rootless podman through alsd run by the same unprivileged user (``contrib/rootless.md``):
real podman of both generations (the host's and the chroot's), real alsd in that podman's
user and mount namespaces, Debian's docker-registry.

``tests.support.rootless`` makes the user and runs everything as that user; see there for
how the chroot's generation gets alsd into its namespaces.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.podman import other_root_unavailable, parse_version, protocol_for
from tests.support.registry import RegistryServer
from tests.support.rootless import (
    OLD_ROOT,
    RootlessEnv,
    ensure_user,
    install_copy,
    mirror_user_into,
    rootless_unavailable,
    world_accessible_fuse,
)

pytest_plugins = ["tests.support.podman", "tests.support.registry"]

pytestmark = [pytest.mark.podman, pytest.mark.fuse, pytest.mark.registry, pytest.mark.slow]

EXPECTED = "hello from a fixture"
TAGS = ["esgz", "esgz-noopt", "zstdchunked-stargz", "zstdchunked-podman54", "zstdchunked-podman43"]
IMPORT_PROBE = "import aiofiles, aiohttp, msgpack, pyfuse3, zstandard, alsd.app.daemon"
TOC_ANNOTATIONS = (
    "containerd.io/snapshot/stargz/toc.digest",
    "io.github.containers.zstd-chunked.manifest-checksum",
)


def layer_keys(registry: RegistryServer, tag: str, protocol: str) -> list[str | None]:
    """The directory names podman of ``protocol`` asks the store for (None: never asks)."""
    req = urllib.request.Request(
        f"{registry.url}/v2/fx/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        layers: list[dict[str, Any]] = json.loads(resp.read())["layers"]
    if protocol == "blob-digest":
        return [la["digest"] for la in layers]
    keys: list[str | None] = []
    for la in layers:
        found = [v for k, v in la.get("annotations", {}).items() if k in TOC_ANNOTATIONS]
        keys.append(found[0] if len(found) == 1 else None)
    return keys


def als_links(env: RootlessEnv, ref: str) -> list[str]:
    overlay = env.graphroot / "overlay"
    if not overlay.is_dir():
        return []
    diffs = (overlay / d / "diff" for d in os.listdir(overlay) if d != "l")
    prefix = f"{env.mountpoint}/{base64.b64encode(ref.encode()).decode()}/"
    return sorted(t for p in diffs if p.is_symlink() and (t := os.readlink(p)).startswith(prefix))


def served(env: RootlessEnv, ref: str) -> list[dict[str, Any]]:
    return [la for la in env.status()["layers"] if la["ref"] == ref]


@pytest.fixture(scope="session")
def rootless_python() -> Path:
    reason = rootless_unavailable()
    if reason is not None:
        pytest.skip(reason)
    pw = ensure_user()
    return install_copy(Path(pw.pw_dir) / "alsd-python", pw.pw_uid, pw.pw_gid)


@pytest.fixture(scope="module", params=["host", "other"])
def rootless(
    request: pytest.FixtureRequest,
    rootless_python: Path,
    registry: RegistryServer,
    fixtures: Path,
) -> Iterator[RootlessEnv]:
    for tag in ["gzip", *TAGS]:
        registry.push_fixture(tag)
    pw = ensure_user()
    chroot: Path | None = None
    pythonpath = str(rootless_python)
    if request.param == "other":
        reason = other_root_unavailable()
        if reason is not None:
            pytest.skip(reason)
        chroot = request.getfixturevalue("other_podman_root")
        assert chroot is not None
        if not (chroot / "usr/bin/newuidmap").exists():
            pytest.skip(f"the chroot {chroot} lacks uidmap (rerun .ci/build-chroot)")
        mirror_user_into(chroot, pw)
        (chroot / OLD_ROOT).mkdir(exist_ok=True)
        # There alsd runs on the chroot's Python with Debian's packages of its dependencies.
        src = install_copy(
            chroot / pw.pw_dir.lstrip("/") / "alsd-src", pw.pw_uid, pw.pw_gid, dependencies=False
        )
        pythonpath = "/" + str(src.relative_to(chroot))
    regconf = '[[registry]]\nlocation = "127.0.0.1"\ninsecure = true\n'
    with world_accessible_fuse():
        env = RootlessEnv(request.param, pw, chroot, pythonpath)
        try:
            env.setup(regconf)
            if chroot is not None:
                probe = env.run_as_user(["python3", "-c", IMPORT_PROBE], {"PYTHONPATH": pythonpath})
                if probe.returncode != 0:
                    pytest.skip(f"alsd does not run on the chroot's Python: {probe.stderr[-500:]}")
            env.start_alsd()
            yield env
        finally:
            env.teardown()


@pytest.mark.parametrize("tag", TAGS)
def test_rootless_pull_run_rmi(rootless: RootlessEnv, registry: RegistryServer, tag: str) -> None:
    env = rootless
    protocol = protocol_for(parse_version(env.version))
    print(f"rootless podman {env.version} ({env.generation}, {protocol})")
    ref = f"{registry.address}/fx:{tag}"
    keys = layer_keys(registry, tag, protocol)
    if None in keys:
        pytest.skip(
            f"podman {env.version} cannot pull the 2020 zstd:chunked layout at all, rootful "
            "or rootless, with or without a store (test_e2e_podman shows it)"
        )
    env.podman("--log-level=warn", "pull", ref)

    # Taken from alsd: the user's layer diffs are symlinks into the user's store.
    b64 = base64.b64encode(ref.encode()).decode()
    assert als_links(env, ref) == sorted(f"{env.mountpoint}/{b64}/{k}/diff" for k in keys), (
        env.alsd_log_tail()
    )
    assert all(la["use_count"] >= 1 for la in served(env, ref)), served(env, ref)

    # The image's owners are the container's root (alsd serves inside the user's
    # namespace), and the container can write over a file of the lazy layer (copy-up).
    script = (
        "cat /data/small.txt; stat -c %u:%g /data/small.txt /bin; "
        "echo more >> /data/small.txt; tail -n 1 /data/small.txt"
    )
    out = env.podman("--log-level=warn", "run", "--rm", ref, "sh", "-c", script).stdout
    assert out.split("\n")[:4] == [EXPECTED, "0:0", "0:0", "more"], out

    env.podman("rmi", ref)
    assert not als_links(env, ref)
    assert all(la["use_count"] == 0 for la in served(env, ref)), served(env, ref)


def test_rootless_gzip_pulls_normally(rootless: RootlessEnv, registry: RegistryServer) -> None:
    ref = f"{registry.address}/fx:gzip"
    env = rootless
    env.podman("pull", ref)
    assert not als_links(env, ref)
    assert all(la["use_count"] == 0 for la in served(env, ref))
    assert env.podman("run", "--rm", ref).stdout.strip() == EXPECTED
    env.podman("rmi", ref)
