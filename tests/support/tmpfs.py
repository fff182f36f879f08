"""A real small tmpfs for full-disk tests: writes fail with a genuine ENOSPC (or EROFS
after a read-only remount), which no mock reproduces faithfully."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (mount(8) syntax, e.g. "1m") at ``mnt``; skip the test
    without root or when mounting fails; unmount (asserting success) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt.mkdir()
    r = run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        r = run("umount", str(mnt))
        assert r.returncode == 0, r.stderr
