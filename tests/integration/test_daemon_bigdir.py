"""A directory of 20 000 entries listed through the real mount: every name exactly once.

The kernel reads a big directory in many READDIR requests with increasing offsets; each
must continue exactly where the previous one stopped (no entry lost, none repeated). The
layer is a synthetic eStargz blob made by :mod:`alsd.oci.estargz_writer` and pushed to the
real docker-registry; alsd runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from alsd.config import RegistrySettings
from alsd.oci.estargz_writer import layer_descriptor, write_estargz
from alsd.oci.manifest import OCI_MANIFEST, Platform
from alsd.oci.reference import parse_reference
from alsd.registry.client import RegistryClient
from alsd.registry.push import Pusher
from alsd.registry.regconf import parse_registries_conf_text
from tests.support.daemon import running_alsd
from tests.support.registry import RegistryServer, registry  # noqa: F401

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

BIG_DIR = "big"
BIG_COUNT = 20_000
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def layer_tar(files: dict[str, bytes]) -> bytes:
    """A layer tar with the given regular files (parent directories made as needed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs: set[str] = set()
        for path, data in files.items():
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d + "/")
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tf.addfile(ti)
            ti = tarfile.TarInfo(path)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


async def push_estargz_image(server: RegistryServer, repo_tag: str, tar: bytes) -> tuple[str, str]:
    """Push a one-layer eStargz image made from ``tar``; returns (reference, blob digest)."""
    result = write_estargz(tar, compression_level=1)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [result.diff_id]},
        "config": {},
    }).encode()  # fmt: skip
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [layer_descriptor(result)],
    }).encode()  # fmt: skip
    ref_str = f"{server.address}/{repo_tag}"
    ref = parse_reference(ref_str)
    conf = parse_registries_conf_text(
        f'[[registry]]\nlocation = "{server.address}"\ninsecure = true\n'
    )
    client = RegistryClient(
        RegistrySettings(max_retries=1, backoff_min_s=0.01, deadline_s=60),
        registries=conf,
        platform=Platform("linux", "amd64"),
    )
    async with client:
        pusher = Pusher(client)
        await pusher.push_blob(ref, result.blob_digest, result.blob)
        await pusher.push_blob(ref, config_digest, config)
        await pusher.push_manifest(ref, manifest, OCI_MANIFEST)
    return ref_str, result.blob_digest


def big_dir_files() -> dict[str, bytes]:
    return {f"{BIG_DIR}/f{i:05d}": b"" for i in range(BIG_COUNT)}


def test_listing_a_20000_entry_directory_shows_each_name_once(
    registry: RegistryServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref, digest = asyncio.run(push_estargz_image(registry, "bigdir:v1", layer_tar(big_dir_files())))
    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    with running_alsd(tmp_path / "alsd", registries_conf=conf) as d:
        big = d.layer_dir(ref, digest) / "diff" / BIG_DIR
        expected = {f"f{i:05d}" for i in range(BIG_COUNT)} | {".", ".."}
        for _ in range(2):  # the second listing is served from a registered layer
            # ls -f: unsorted, with . and .., in the order and pieces the kernel reads
            r = subprocess.run(["ls", "-f", str(big)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr + d.log_tail()
            seen = Counter(r.stdout.splitlines())
            assert set(seen) == expected, d.log_tail()
            assert max(seen.values()) == 1, [n for n, c in seen.items() if c > 1][:10]
        assert Counter(os.listdir(big)) == Counter(expected - {".", ".."})
