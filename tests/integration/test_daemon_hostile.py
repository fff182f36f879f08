"""Hostile layers through the real mount: refused or EIO, alsd's memory bounded, alsd
keeps serving.

The layers are hand-made eStargz blobs with chunk bombs (tests/support/hostile.py: a gzip
member of zeros that inflates ~1000:1, behind whatever size and digest the TOC declares),
pushed to the real docker-registry; alsd runs as a subprocess and its peak RSS is read
from /proc (VmHWM) after each attack.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from tests.support.daemon import AlsdProcess, running_alsd
from tests.support.hostile import HostileBlob, push_blob_image
from tests.support.registry import RegistryServer, registry  # noqa: F401

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

MiB = 1 << 20
RSS_LIMIT = 1 << 30


def peak_rss(d: AlsdProcess) -> int:
    """Peak resident size of the alsd process so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def read_errno(path: Path) -> int | None:
    """None if the whole file reads, else the errno of the failing read."""
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError as exc:
        return exc.errno
    return None


def test_chunk_bombs_are_refused_or_eio_in_bounded_memory(
    registry: RegistryServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    # 1. A chunk declared at 1 TiB: the layer is refused when its TOC is read, so the
    #    store has no such layer (podman pulls it the normal way).
    huge = HostileBlob("estargz")
    huge.file("ok.txt", b"fine\n")
    huge.bomb("bomb", declared=1 << 40, inflated=384 * MiB)
    huge_ref, huge_digest = asyncio.run(push_blob_image(registry, "bomb:huge", *huge.finish()))
    # 2. A chunk under the ceiling (48 MiB) whose member inflates to 384 MiB and whose
    #    digest is not that of its bytes: served, but reading it is EIO.
    under = HostileBlob("estargz")
    under.file("ok.txt", b"fine\n")
    under.bomb("bomb", declared=48 * MiB, inflated=384 * MiB, digest="sha256:" + "0" * 64)
    under.file("after.txt", b"still here\n")
    under_ref, under_digest = asyncio.run(push_blob_image(registry, "bomb:under", *under.finish()))

    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    with running_alsd(tmp_path / "alsd", registries_conf=conf) as d:
        layer = d.layer_dir(huge_ref, huge_digest)
        assert not (layer / "diff").exists(), d.log_tail()
        assert "max_chunk_bytes" in d.log(), d.log_tail()
        assert peak_rss(d) < RSS_LIMIT

        diff = d.layer_dir(under_ref, under_digest) / "diff"
        assert (diff / "ok.txt").read_bytes() == b"fine\n", d.log_tail()
        requests = []
        for _ in range(2):
            assert read_errno(diff / "bomb") == errno.EIO, d.log_tail()
            assert peak_rss(d) < RSS_LIMIT, f"peak RSS {peak_rss(d) // MiB} MiB"
            (layer_status,) = [la for la in d.status()["layers"] if la["digest"] == under_digest]
            requests.append(layer_status["http_requests"])
        # The chunk that failed is remembered: the second read asked the registry nothing.
        assert requests[0] == requests[1], requests
        # alsd keeps serving, this layer and the control API.
        assert (diff / "after.txt").read_bytes() == b"still here\n"
        assert (diff / "ok.txt").read_bytes() == b"fine\n"
        assert registry.address in d.status()["registry_hosts"]
        print(f"alsd peak RSS after both bombs: {peak_rss(d) // MiB} MiB")
