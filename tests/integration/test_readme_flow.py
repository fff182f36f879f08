"""README's two commands in the order written: ``demo/run`` leaves a ``.venv`` with
``pip install -e .`` only, and ``tests/run`` must then work in it (installing the test
extras itself, quietly) instead of dying with ``No module named pytest``.

Runs on a copy of the tree with a fresh virtualenv and the real pip (from the package
index pip is configured with), so it is slow: about a minute, less with pip's cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tests_run_works_in_the_venv_demo_run_leaves(tmp_path: Path) -> None:
    tree = tmp_path / "alsd"
    for part in ("alsd", "pyproject.toml", "README.md", "tests/run", ".ci/build-chroot"):
        src, dst = REPO / part, tree / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (tree / "tests" / "__init__.py").write_text("")
    (tree / "tests" / "test_smoke.py").write_text(
        "import alsd.cli\n\n\ndef test_importable() -> None:\n    assert alsd.cli.main\n"
    )
    # What demo/run does on a fresh clone: a venv with alsd, without the test extras.
    venv = tree / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "-e", "."],
        cwd=tree, capture_output=True, text=True,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    no_pytest = subprocess.run([str(venv / "bin/python"), "-c", "import pytest"])
    assert no_pytest.returncode != 0  # the situation README's order used to break on

    # As a shell on the machine would run it: pip's own settings kept, no venv active.
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    r = subprocess.run(
        ["tests/run", "-q", "-p", "no:cacheprovider", "tests/test_smoke.py"],
        cwd=tree, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
    assert "installing the test dependencies into .venv" in r.stderr
    # pip's own output (progress, warnings) went to a log, not to the terminal.
    assert "WARNING" not in r.stderr and "Successfully" not in r.stdout + r.stderr

    again = subprocess.run(
        ["tests/run", "-q", "-p", "no:cacheprovider", "tests/test_smoke.py"],
        cwd=tree, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "installing" not in again.stderr  # nothing to install the second time
