"""The podman harness itself, proven with real podman and a plain-directory ALS (no alsd).

spec.md §1.12: a hand-made directory ``<store>/base64(ref)/<digest>/{diff,info,blob}``
is used by podman instead of pulling the layer. Which digest names the directory depends
on the generation: podman < 5.1 asks for the compressed blob digest of every layer (we
serve the ``gzip`` tag), podman >= 5.1 asks only for TOC-annotated layers, by TOC digest
(we serve the ``esgz`` tag). If these tests pass, the harness's configs reach podman, the
chroot sees a directory made outside it, and the end-to-end tests can rely on it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.oci_layout import OciLayout

if TYPE_CHECKING:
    from tests.support.podman import PodmanEnv, PodmanFactory
    from tests.support.registry import RegistryServer

pytest_plugins = ["tests.support.podman", "tests.support.registry"]

pytestmark = [pytest.mark.podman, pytest.mark.registry, pytest.mark.slow]

EXPECTED = "hello from a fixture"
TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer) -> dict[str, str]:
    return {tag: registry.push_fixture(tag) for tag in ("gzip", "esgz")}


def _extract_layer(blob: Path, diff: Path) -> None:
    """Unpack a layer as overlayfs wants a lower dir: whiteouts as char 0/0, opaque xattrs."""
    diff.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--numeric-owner", "-xzf", str(blob), "-C", str(diff)],
        check=True, capture_output=True,
    )
    for dirpath, _dirs, files in os.walk(diff):
        for name in files:
            if not name.startswith(".wh."):
                continue
            p = Path(dirpath) / name
            p.unlink()
            if name == ".wh..wh..opq":
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            else:
                os.mknod(Path(dirpath) / name[4:], 0o600 | 0o020000, os.makedev(0, 0))


def build_plain_als(store: Path, layout: OciLayout, tag: str, ref: str, protocol: str) -> int:
    """Make ``store/base64(ref)/<digest>/{diff,info,blob}`` for each layer of ``tag``.

    ``diff`` is always unpacked from the ``gzip`` tag's layer at the same position (all
    tags hold the same files), so an eStargz layer needs no eStargz reader here.
    Returns the number of layer directories made.
    """
    image = layout.image(tag)
    plain = layout.image("gzip")
    diff_ids = json.loads(layout.blob(image.config_digest))["rootfs"]["diff_ids"]
    refdir = store / base64.standard_b64encode(ref.encode()).decode()
    refdir.mkdir(parents=True)
    for i, desc in enumerate(image.layers):
        plain_blob = layout.blob_path(plain.layers[i].digest)
        info: dict[str, Any] = {
            "compressed-diff-digest": desc.digest,
            "compressed-size": desc.size,
            "compression": 2,
        }
        if protocol == "blob-digest":
            key = desc.digest
            # Old protocol: diff-digest is required (podman 4.3.1 panics without it) and
            # the exact size keeps run and save working (spec.md §1.6).
            info["diff-digest"] = diff_ids[i]
            with gzip.open(layout.blob_path(desc.digest)) as f:
                info["diff-size"] = sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
        else:
            key = desc.annotations[TOC_ANNOTATION]
            info.update({"toc-digest": key, "diff-size": -1,
                         "flags": {"expected-layer-diffid": diff_ids[i]}})
        layer = refdir / key
        layer.mkdir()
        _extract_layer(plain_blob, layer / "diff")
        (layer / "info").write_text(json.dumps(info))
        shutil.copyfile(layout.blob_path(desc.digest), layer / "blob")
    return len(image.layers)


def _als_layer_links(penv: PodmanEnv) -> list[str]:
    """Targets of podman's layer ``diff`` entries that are symlinks (ALS layers)."""
    # Not Path.glob: it drops symlinks whose target does not exist, and a target inside
    # the chroot does not exist as seen from the host.
    overlay = penv.graphroot / "overlay"
    diffs = (overlay / d / "diff" for d in os.listdir(overlay) if d != "l")
    return sorted(os.readlink(p) for p in diffs if p.is_symlink())


def test_run_from_loopback_registry(
    podman_env: PodmanFactory, podman_generation: str, pushed: dict[str, str]
) -> None:
    """Without an ALS: the harness's configs let podman pull from the insecure loopback
    registry and run a container on this machine."""
    penv = podman_env(podman_generation)
    out = penv.run("run", "--rm", pushed["gzip"]).stdout
    assert out.strip() == EXPECTED
    assert not _als_layer_links(penv)


def test_plain_directory_als(
    podman_env: PodmanFactory, podman_generation: str, pushed: dict[str, str],
    fixtures: Path,
) -> None:
    """With a hand-made ALS directory (spec.md §1.12), podman takes every layer from it."""
    store = podman_env.workdir(podman_generation) / "als"
    store.mkdir()
    penv = podman_env(podman_generation, als_mount=store)
    expected_protocol = "toc-digest" if penv.version_tuple >= (5, 1) else "blob-digest"
    assert penv.protocol == expected_protocol
    # podman >= 5.1 asks the ALS only about TOC-annotated layers: serve eStargz there.
    tag = "gzip" if penv.protocol == "blob-digest" else "esgz"
    ref = pushed[tag]
    layers = build_plain_als(store, OciLayout(fixtures / "images"), tag, ref, penv.protocol)

    penv.run("pull", "--quiet", ref)
    links = _als_layer_links(penv)
    assert len(links) == layers, f"podman {penv.version} did not use the ALS: {links}"
    als_in_podman = penv.podman_path(store)
    assert all(t.startswith(als_in_podman + "/") and t.endswith("/diff") for t in links)

    out = penv.run("run", "--rm", ref).stdout
    assert out.strip() == EXPECTED
    with contextlib.suppress(AssertionError):
        penv.run("rmi", "-f", ref)
