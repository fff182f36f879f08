"""The command line as a person meets it, run as the real ``alsd`` process: the help,
mistakes named with their fix, and the exit statuses of alsd(8) in every command
(0 success, 1 the operation failed, 2 usage or configuration error)."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from alsd import cli

REPO = Path(__file__).resolve().parents[2]

# One argument list per command that gets as far as reading its configuration, with
# nothing it could reach (no daemon, no registry): the daemon is "" .
COMMANDS = {
    "daemon": [],
    "inspect": ["inspect", "registry.invalid/app:1.0"],
    "convert": ["convert", "registry.invalid/app:1.0", "registry.invalid/app:esgz"],
    "profile": ["profile", "show", "registry.invalid/app:1.0"],
    "status": ["status"],
    "auth-helper": ["auth-helper"],
}


def alsd(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("REGISTRY_AUTH_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "alsd", *argv],
        capture_output=True, text=True, env=env, input="", timeout=120, cwd=cwd,
    )  # fmt: skip


def test_every_command_is_covered_here() -> None:
    assert set(COMMANDS) == {"daemon", *cli.SUBCOMMANDS}


def test_help_lists_the_commands_with_a_line_each() -> None:
    r = alsd("--help")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    start = lines.index("commands:")
    listing = "\n".join(lines[start : start + 12])
    for name, (_, help_) in cli.SUBCOMMANDS.items():
        assert f"    {name} " in listing, name
        assert help_.split()[0] in listing
    assert "Exit status of every command: 0 success; 1 the operation failed" in r.stdout
    assert max(len(line) for line in lines) <= 100  # wrapped, not one long epilog line


def test_an_unknown_command_names_the_commands() -> None:
    r = alsd("frobnicate")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("alsd: unknown command 'frobnicate'; the commands are ")
    for name in cli.SUBCOMMANDS:
        assert name in r.stderr


def test_a_command_after_the_daemons_options_says_where_it_goes(tmp_path: Path) -> None:
    r = alsd("--config", str(tmp_path / "x.toml"), "status", "--json")
    assert r.returncode == 2
    assert "the command comes first, before its options: alsd status [options]" in r.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_unknown_option_exits_2(name: str) -> None:
    r = alsd(*COMMANDS[name], "--frobnicate")
    assert r.returncode == 2 and "--frobnicate" in r.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_help(name: str) -> None:
    r = alsd(*COMMANDS[name][:1], "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: alsd")
    r = alsd(*COMMANDS[name][:2], "--help")  # and each subcommand of one (profile show)
    assert r.returncode == 0 and r.stdout.startswith("usage: alsd")


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("mistake", ["missing", "bad-key", "bad-registries-conf"])
def test_the_same_configuration_error_exits_2_in_every_command(
    name: str, mistake: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "alsd.toml"
    # Whatever the command gets to, it is inside tmp_path.
    base = (
        f'mountpoint = "{tmp_path / "mnt"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[control]\nsocket = "{tmp_path / "alsd.sock"}"\n'
    )
    if mistake == "bad-key":
        cfg.write_text(base + "[fetch]\nconcurrency = 0\n")
        want = [str(cfg), "'fetch.concurrency' must be a number greater than 0"]
    elif mistake == "bad-registries-conf":
        conf = tmp_path / "registries.conf"
        conf.write_text("[[registry]]\nlocation = 5\n")
        cfg.write_text(base + f'[registry]\nregistries_conf = "{conf}"\n')
        want = [str(conf), "'location'"]
        if name in ("status", "auth-helper", "profile"):
            # They get no further than what they need first ([control] socket, the
            # recorded profiles in state_dir), fail there (1) and say so.
            r = alsd(*COMMANDS[name], "--config", str(cfg))
            assert r.returncode == 1
            assert ("no image of that name" if name == "profile" else "alsd is not running") in (
                r.stderr
            )
            return
    else:
        want = [f"{cfg}: no such file"]
    r = alsd(*COMMANDS[name], "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    for w in want:
        assert w in r.stderr
    assert not (tmp_path / "mnt").exists()  # nothing was done


def _plain_layer(path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("hello")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    path.write_bytes(gzip.compress(buf.getvalue()))


@pytest.mark.parametrize("name", COMMANDS)
def test_a_failed_operation_exits_1_and_says_why(name: str, tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    conf = tmp_path / "registries.conf"
    conf.write_text('[[registry]]\nlocation = "127.0.0.1:9"\ninsecure = true\n')
    cfg = tmp_path / "alsd.toml"
    cfg.write_text(
        f'mountpoint = "{tmp_path / "not-a-dir"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[control]\nsocket = "{tmp_path / "alsd.sock"}"\n'
        f'[fetch]\nmax_retries = 0\n[registry]\nregistries_conf = "{conf}"\n'
    )
    argv = {
        "daemon": ["--config", str(cfg)],
        "inspect": ["inspect", str(tmp_path / "layer.tar.gz")],
        "convert": ["convert", "--config", str(cfg), "127.0.0.1:9/a:1", "127.0.0.1:9/a:2"],
        "profile": ["profile", "show", "--config", str(cfg), "127.0.0.1:9/a:1"],
        "status": ["status", "--config", str(cfg)],
        "auth-helper": ["auth-helper", "--config", str(cfg)],
    }[name]
    want = {
        "daemon": f"cannot start: {tmp_path / 'not-a-dir'}: not a directory",
        "inspect": "not lazily pullable: a plain gzip layer",
        "convert": "127.0.0.1:9",
        "profile": "127.0.0.1:9/a:1",
        "status": f"alsd is not running (no socket at {tmp_path / 'alsd.sock'})",
        "auth-helper": f"alsd is not running (no socket at {tmp_path / 'alsd.sock'})",
    }[name]
    _plain_layer(tmp_path / "layer.tar.gz")
    r = alsd(*argv)
    assert r.returncode == 1, r.stderr
    assert want in r.stderr


def test_a_missing_file_for_inspect_is_named(tmp_path: Path) -> None:
    r = alsd("inspect", "/nonexistent.blob")
    assert r.returncode == 2
    assert r.stderr.startswith("alsd inspect: /nonexistent.blob: no such file")
