"""Shared pytest configuration: fixture locations and automatic skips with reasons."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The support modules are pytest plugins imported by test modules: rewrite their asserts.
pytest.register_assert_rewrite("tests.support")

REPO = Path(__file__).resolve().parent.parent


def fixtures_dir() -> Path:
    """The images made by other people's tools (podman, ctr-remote).

    They live beside the clone, in ``../shared/fixtures``; ``ALSD_FIXTURES`` overrides.
    """
    return Path(os.environ.get("ALSD_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    d = fixtures_dir()
    if not (d / "images" / "index.json").exists():
        pytest.skip(f"fixtures not found at {d} (set ALSD_FIXTURES)")
    return d


def _fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "FUSE tests mount as root"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (apt-get install fuse3)"
    return None


def _registry_unavailable() -> str | None:
    if shutil.which("docker-registry") is None:
        return "docker-registry not installed (apt-get install docker-registry)"
    if shutil.which("skopeo") is None:
        return "skopeo not installed (apt-get install skopeo)"
    return None


def _podman_unavailable() -> str | None:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        return "podman/runc not installed"
    return _fuse_unavailable() or _registry_unavailable()


def _crio_unavailable() -> str | None:
    from tests.support.crio import crio_unavailable  # imports this module: not at the top

    return _fuse_unavailable() or _registry_unavailable() or crio_unavailable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {
        "fuse": _fuse_unavailable(),
        "registry": _registry_unavailable(),
        "podman": _podman_unavailable(),
    }
    if any(item.get_closest_marker("crio") for item in items):
        checks["crio"] = _crio_unavailable()
    for item in items:
        for marker, reason in checks.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))
