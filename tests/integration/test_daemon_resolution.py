"""Lookups of layers alsd cannot resolve, as podman 4.3 makes them: one per layer of a
pull, in turn (containers/image holds a lock around them, spec.md §1.9), each
``stat(<ref>/<digest>/diff)``. Every syscall runs in a subprocess with a timeout, since a
hung FUSE request is the worst failure.

The registries here are real sockets: a port nobody listens on (connection refused) and
a socket that listens but never accepts (a firewalled or hung registry).
"""

from __future__ import annotations

import base64
import errno
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import AlsdProcess, running_alsd
from tests.support.oci_layout import OciLayout
from tests.support.registry import RegistryServer, registry  # noqa: F401

pytestmark = [pytest.mark.fuse]

SYSCALL_TIMEOUT_S = 90.0
ENOENT = str(errno.ENOENT)


def _stat_script(path: Path) -> list[str]:
    code = (
        "import os, sys\n"
        f"try:\n    os.stat({str(path)!r})\nexcept OSError as e:\n"
        "    print(e.errno)\n    sys.exit(0)\n"
        "print('exists')\n"
    )
    return [sys.executable, "-c", code]


def _stat_errno(path: Path) -> str:
    r = subprocess.run(
        _stat_script(path), capture_output=True, text=True, timeout=SYSCALL_TIMEOUT_S
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _layer(alsd: AlsdProcess, ref: str, n: int) -> Path:
    return alsd.mountpoint / base64.b64encode(ref.encode()).decode() / f"sha256:{n:064x}"


def _engine(alsd: AlsdProcess) -> dict[str, Any]:
    doc: dict[str, Any] = alsd.status()["engine"]
    return doc


@pytest.fixture
def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens there any more: connect() is refused
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)  # connections complete in the backlog and are never answered
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_an_unreachable_registry_is_asked_once_per_image(tmp_path: Path, refused_port: int) -> None:
    ref = f"127.0.0.1:{refused_port}/x/y:latest"
    with running_alsd(tmp_path, settings={"fetch.max_retries": 0}) as alsd:
        for n in (1, 2, 3):  # three layers of one pull
            # issue 5: a layer that cannot be served answers ENOENT (podman pulls it).
            assert _stat_errno(_layer(alsd, ref, n) / "diff") == ENOENT
        e = _engine(alsd)
        assert e["image_resolves"] == 1, e
        assert e["negative_hits"] >= 2, e


def test_a_silent_registry_costs_one_timeout_and_stalls_no_other_image(
    tmp_path: Path,
    silent_port: int,
    registry: RegistryServer,  # noqa: F811
    fixtures: Path,
) -> None:
    good_ref = registry.push_fixture("esgz")
    la = OciLayout(fixtures / "images").image("esgz").layers[0]
    silent_ref = f"127.0.0.1:{silent_port}/x/y:latest"
    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    settings = {
        "fetch.resolve_timeout_s": 10.0,
        "fetch.request_timeout_s": 600.0,  # the silent registry's resolution outlives the test
        "fetch.max_retries": 0,
    }
    with running_alsd(tmp_path, registries_conf=conf, settings=settings) as alsd:
        slow = subprocess.Popen(
            _stat_script(_layer(alsd, silent_ref, 1) / "diff"), stdout=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 30
            while alsd.status()["resolving"] == 0:
                assert slow.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            # Another image is served while the silent one is being waited for.
            good = alsd.layer_dir(good_ref, la.digest) / "diff" / "data" / "small.txt"
            r = subprocess.run(
                ["cat", str(good)], capture_output=True, timeout=SYSCALL_TIMEOUT_S, check=True
            )
            assert r.stdout == b"hello from a fixture\n"
            assert slow.poll() is None, "the silent registry's lookup ended first"
            out, _ = slow.communicate(timeout=SYSCALL_TIMEOUT_S)
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
        assert out.strip() == ENOENT
        assert _engine(alsd)["resolve_timeouts"] == 1
        # The next layers of that pull are answered at once, without a timeout each.
        for n in (2, 3):
            assert _stat_errno(_layer(alsd, silent_ref, n) / "diff") == ENOENT
        e = _engine(alsd)
        assert e["resolve_timeouts"] == 1, e
        assert e["image_resolves"] == 2, e  # the silent image and the good one
