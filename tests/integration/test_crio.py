"""CRI-O pulls and runs images through alsd: real crio 1.33 (containers/storage 1.58, the
TOC-digest generation of the protocol), real crictl, real alsd FUSE mount, Debian's
docker-registry.

CRI-O takes alsd's store from ``contrib/crio/crio.conf.d/50-alsd.conf`` (the drop-in an
admin installs, with the mountpoint replaced by the test's), and its credentials from its
``global_auth_file``, which alsd reads too (``[registry] auth_file``), as
``contrib/crio/README.md`` describes. Where crio runs (host or a Debian 13 chroot) is
``tests.support.crio``'s business.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.support.crio import Crio, CrioFactory
from tests.support.daemon import AlsdProcess, running_alsd
from tests.support.registry import RegistryServer

pytest_plugins = ["tests.support.crio", "tests.support.podman", "tests.support.registry"]

pytestmark = [pytest.mark.crio, pytest.mark.fuse, pytest.mark.registry, pytest.mark.slow]

EXPECTED = "hello from a fixture"
# Every fixture tag whose layers carry a TOC annotation containers/storage 1.58 knows.
LAZY_TAGS = ["esgz", "esgz-noopt", "zstdchunked-stargz", "zstdchunked-podman54"]
TOC_ANNOTATIONS = (
    "containerd.io/snapshot/stargz/toc.digest",
    "io.github.containers.zstd-chunked.manifest-checksum",
)
DROPIN = REPO / "contrib" / "crio" / "crio.conf.d" / "50-alsd.conf"
DEFAULT_MOUNTPOINT = "/var/lib/alsd/store"


@dataclass
class Stack:
    crio: Crio
    alsd: AlsdProcess
    registry: RegistryServer
    private: RegistryServer

    def ref(self, tag: str, registry: RegistryServer | None = None) -> str:
        return f"{(registry or self.registry).address}/fx:{tag}"

    def links(self, ref: str | None = None) -> list[str]:
        """Targets of crio's layer ``diff`` symlinks (layers taken from an ALS)."""
        overlay = self.crio.graphroot / "overlay"
        diffs = (overlay / d / "diff" for d in os.listdir(overlay) if d != "l")
        targets = sorted(os.readlink(p) for p in diffs if p.is_symlink())
        if ref is None:
            return targets
        prefix = f"{self.crio.path(self.alsd.mountpoint)}/{b64(ref)}/"
        return [t for t in targets if t.startswith(prefix)]

    def served(self, ref: str) -> list[dict[str, Any]]:
        return [la for la in self.alsd.status()["layers"] if la["ref"] == ref]


def b64(ref: str) -> str:
    return base64.b64encode(ref.encode()).decode()


def toc_digests(registry: RegistryServer, tag: str) -> list[str | None]:
    """Per layer, the TOC digest containers/storage >= 1.54 names it by (None: not offered)."""
    req = urllib.request.Request(
        f"{registry.url}/v2/fx/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        manifest = json.loads(resp.read())
    keys: list[str | None] = []
    for layer in manifest["layers"]:
        ann = layer.get("annotations", {})
        found = [ann[a] for a in TOC_ANNOTATIONS if a in ann]
        keys.append(found[0] if len(found) == 1 else None)
    return keys


def dropin_for(crio_factory: CrioFactory, alsd: AlsdProcess) -> str:
    """contrib's drop-in, naming the test's store as crio sees it (crio runs in a chroot on
    Debian 12)."""
    dropin = DROPIN.read_text()
    assert DEFAULT_MOUNTPOINT in dropin
    return dropin.replace(DEFAULT_MOUNTPOINT, crio_factory.path(alsd.mountpoint))


@pytest.fixture(scope="module")
def stack(
    crio_factory: CrioFactory,
    registry: RegistryServer,
    registry_htpasswd: RegistryServer,
    fixtures: Path,
) -> Iterator[Stack]:
    for tag in ["gzip", "zstdchunked-podman43", *LAZY_TAGS]:
        registry.push_fixture(tag)
    registry_htpasswd.push_fixture("esgz")
    work = crio_factory.workdir()
    # CRI-O's global auth file (where a node keeps its pull credentials), read by alsd too.
    auth = registry_htpasswd.write_auth_json(work / "auth.json")
    regconf = work / "alsd-registries.conf"
    regconf.write_text(
        "".join(
            f'[[registry]]\nlocation = "{r.address}"\ninsecure = true\n'
            for r in (registry, registry_htpasswd)
        )
    )
    settings = {"prefetch.background": False}
    with running_alsd(
        work / "alsd", registries_conf=regconf, auth_file=auth, settings=settings
    ) as alsd:
        crio = crio_factory(
            work,
            dropins={DROPIN.name: dropin_for(crio_factory, alsd)},
            global_auth_file=auth,
            registries=(registry.address, registry_htpasswd.address),
        )
        yield Stack(crio, alsd, registry, registry_htpasswd)
        crio.stop()


@pytest.mark.parametrize("tag", LAZY_TAGS)
def test_lazy_image_runs_through_crio(stack: Stack, tag: str) -> None:
    ref = stack.ref(tag)
    keys = toc_digests(stack.registry, tag)
    assert None not in keys, keys
    stack.crio.crictl("pull", ref)

    # Taken from alsd: crio's layer diffs are symlinks into the store, alsd counts the use.
    mount = stack.crio.path(stack.alsd.mountpoint)
    assert stack.links(ref) == sorted(f"{mount}/{b64(ref)}/{k}/diff" for k in keys), (
        stack.alsd.log_tail()
    )
    served = stack.served(ref)
    assert len(served) == len(keys)
    assert all(la["use_count"] >= 1 for la in served), served

    out = stack.crio.run_container(ref)
    assert out.strip() == EXPECTED
    # Whiteouts and the opaque directory of layer 2, as the container sees them.
    out = stack.crio.run_container(ref, ["sh", "-c", "ls -A /gone; echo --; ls -A /opq"])
    assert out.split() == ["b", "--", "z"], out

    stack.crio.crictl("rmi", ref)
    assert not stack.links(ref)
    assert all(la["use_count"] == 0 for la in stack.served(ref)), stack.served(ref)


def test_gzip_image_falls_back_to_a_normal_pull(stack: Stack) -> None:
    ref = stack.ref("gzip")
    stack.crio.crictl("pull", ref)
    assert not stack.links(ref)
    assert all(la["use_count"] == 0 for la in stack.served(ref))
    assert stack.crio.run_container(ref).strip() == EXPECTED
    stack.crio.crictl("rmi", ref)


def test_zstdchunked_2020_layout_is_not_offered_to_alsd(stack: Stack) -> None:
    """podman 4.3's zstd:chunked carries only the io.containers.* annotations, which
    containers/storage >= 1.54 no longer reads: CRI-O 1.33 never asks alsd about it, and
    cannot pull the image at all (as podman 5.4 cannot, test_e2e_podman): decompressing
    the 2020-layout blob yields the tar plus the TOC frame, whose digest is not the
    config's DiffID."""
    ref = stack.ref("zstdchunked-podman43")
    assert set(toc_digests(stack.registry, "zstdchunked-podman43")) == {None}
    pull = stack.crio.crictl("pull", ref, check=False)
    assert not stack.served(ref)
    assert not stack.links(ref)
    assert pull.returncode != 0 and "does not match config's DiffID" in pull.stderr, pull.stderr


def test_crio_auth_file_reaches_alsd(stack: Stack) -> None:
    """A registry that wants a password: CRI-O has it in its global auth file, alsd reads
    the same file. Without the credentials alsd would answer "not here" and CRI-O would
    pull the layers itself (no symlinks into the store)."""
    ref = stack.ref("esgz", stack.private)
    stack.crio.crictl("pull", ref)
    assert len(stack.links(ref)) == 2, stack.alsd.log_tail()
    assert all(la["use_count"] >= 1 for la in stack.served(ref))
    assert stack.crio.run_container(ref).strip() == EXPECTED
    stack.crio.crictl("rmi", ref)
    assert all(la["use_count"] == 0 for la in stack.served(ref))


def test_pull_secret_reaches_alsd_through_the_auth_helper(
    crio_factory: CrioFactory, registry_htpasswd: RegistryServer, fixtures: Path
) -> None:
    """Credentials that come with the pull (crictl --creds, as the kubelet passes a pull
    secret) and are in no file: containers/image in CRI-O hands them to registries.conf's
    ``additional-layer-store-auth-helper``, ``alsd auth-helper`` forwards them to alsd,
    which has no other credentials for this registry."""
    ref = registry_htpasswd.push_fixture("esgz")
    work = crio_factory.workdir()
    empty = work / "alsd-auth.json"
    empty.write_text('{"auths": {}}')
    regconf = work / "alsd-registries.conf"
    registry_htpasswd.write_registries_conf(regconf)
    with running_alsd(work / "alsd", registries_conf=regconf, auth_file=empty) as alsd:
        # The helper runs where crio runs: in the chroot, on its Python with Debian's
        # packages of alsd's dependencies (.ci/build-chroot) and a copy of alsd.
        if crio_factory.chroot is None:
            python, pythonpath = sys.executable, str(REPO)
        else:
            shutil.copytree(REPO / "alsd", work / "src" / "alsd")
            python, pythonpath = "python3", crio_factory.path(work / "src")
        helper = work / "auth-helper"
        helper.write_text(
            "#!/bin/sh\n"
            f"PYTHONPATH={pythonpath} exec {python} -m alsd auth-helper "
            f"--socket {crio_factory.path(alsd.control_socket)}\n"
        )
        helper.chmod(0o755)
        crio = crio_factory(
            work,
            dropins={DROPIN.name: dropin_for(crio_factory, alsd)},
            registries=(registry_htpasswd.address,),
            auth_helper=crio_factory.path(helper),
        )
        user = f"{registry_htpasswd.username}:{registry_htpasswd.password}"
        crio.crictl("pull", "--creds", user, ref)
        stack = Stack(crio, alsd, registry_htpasswd, registry_htpasswd)
        assert len(stack.links(ref)) == 2, alsd.log_tail()
        assert all(la["use_count"] >= 1 for la in stack.served(ref))
        assert crio.run_container(ref).strip() == EXPECTED
        crio.crictl("rmi", ref)
        crio.stop()
