"""The daemon's lifecycle: SIGTERM unmounts, a SIGKILLed instance's dead mount is recovered
and the restarted daemon serves from its state on disk, config mistakes exit 2."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import REPO, alsd_command, start_alsd, unmount, write_config
from tests.support.oci_layout import OciLayout
from tests.support.registry import RegistryServer, registry  # noqa: F401


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.fuse
def test_sigterm_unmounts_and_exits_0(tmp_path: Path) -> None:
    p = start_alsd(tmp_path)
    try:
        assert os.path.ismount(p.mountpoint)
        # the control socket: root's only (it hands credentials over), its dir created
        assert os.stat(p.control_socket).st_mode & 0o777 == 0o600
        assert os.stat(p.control_socket.parent).st_mode & 0o077 == 0
        p.stop()  # asserts exit 0 and no mount left
        assert not p.control_socket.exists()
    finally:
        p.cleanup()


def _bdi_read_ahead_kb(mountpoint: Path) -> int:
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                dev = fields[2]
    assert dev is not None, f"{mountpoint} not in mountinfo"
    return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())


@pytest.mark.fuse
@pytest.mark.parametrize("kib", [4096, 512])
def test_read_ahead_of_the_mount_is_set_after_init(tmp_path: Path, kib: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may set a bdi's read-ahead")
    p = start_alsd(tmp_path, settings={"fuse.read_ahead_kb": kib})
    try:
        # Set from the event loop after FUSE INIT, which would otherwise lower it to the
        # kernel's default (128).
        deadline = time.monotonic() + 10
        while _bdi_read_ahead_kb(p.mountpoint) != kib:
            assert time.monotonic() < deadline, _bdi_read_ahead_kb(p.mountpoint)
            time.sleep(0.02)  # polling interval
        assert os.listdir(p.mountpoint) == []  # and the daemon still answers
        p.stop()
    finally:
        p.cleanup()


@pytest.mark.fuse
def test_mountpoint_is_created(tmp_path: Path) -> None:
    mnt = tmp_path / "a" / "b" / "store"
    p = start_alsd(tmp_path, mountpoint=mnt)
    try:
        assert os.path.ismount(mnt)
        p.stop()
    finally:
        p.cleanup()


@pytest.mark.fuse
@pytest.mark.registry
def test_sigkill_then_restart_recovers_and_serves_from_disk(
    tmp_path: Path,
    registry: RegistryServer,  # noqa: F811
    fixtures: Path,
) -> None:
    ref = registry.push_fixture("esgz")
    la = OciLayout(fixtures / "images").image("esgz").layers[0]
    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    # No landmark prefetch: after the restart, every registry request would be ours.
    p = start_alsd(tmp_path, registries_conf=conf, settings={"prefetch.landmark": False})
    try:
        f = p.layer_dir(ref, la.digest) / "diff" / "data" / "big.bin"
        data = f.read_bytes()
        assert len(data) == 300_000
        # chunks are written to the store after they are served: wait until they are
        deadline = time.monotonic() + 30
        while p.status()["chunk_store"]["bytes"] < 300_000:
            assert time.monotonic() < deadline, p.status()["chunk_store"]
            time.sleep(0.05)
        p.kill()
        with pytest.raises(OSError) as exc:  # what a crash leaves: a dead mount
            os.listdir(p.mountpoint)
        assert exc.value.errno == errno.ENOTCONN
    except BaseException:
        p.cleanup()  # also removes the dead mount
        raise
    p2 = start_alsd(tmp_path, registries_conf=conf)
    try:
        assert "dead mount" in p2.log()
        assert f.read_bytes() == data
        doc = p2.status()
        assert doc["engine"]["layers_from_metadata"] >= 1
        assert doc["engine"]["resolve_requests"] == 0  # no footer/TOC fetched again
        # the file's chunks came from the chunk store, not from the registry
        assert doc["fetch"]["requests"] == 0, doc["fetch"]
        p2.stop()
    finally:
        p2.cleanup()


def test_malformed_config_exits_2_with_one_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[fetch]\nconcurrency = "many"\n')
    r = subprocess.run(alsd_command(bad), capture_output=True, text=True, env=_env())
    assert r.returncode == 2
    assert r.stderr.strip() == (f"alsd: {bad}: 'fetch.concurrency' must be an integer, got 'many'")
    bad.write_text("bogus = 1\n")
    r = subprocess.run(alsd_command(bad), capture_output=True, text=True, env=_env())
    assert r.returncode == 2
    assert f"{bad}: unknown key 'bogus'" in r.stderr
    missing = tmp_path / "missing.toml"
    r = subprocess.run(alsd_command(missing), capture_output=True, text=True, env=_env())
    assert r.returncode == 2
    assert f"{missing}: no such file" in r.stderr


def test_help_documents_every_option_and_setting() -> None:
    from alsd import config

    r = subprocess.run(
        [sys.executable, "-m", "alsd", "--help"], capture_output=True, text=True, env=_env()
    )
    assert r.returncode == 0
    for flag in ("--config", "--mountpoint", "--state-dir", "--log-level"):
        assert flag in r.stdout
    for key, _, _ in config.iter_settings():
        assert key in r.stdout, key
    for sub in ("status", "auth-helper"):
        assert f"    {sub} " in r.stdout


def test_status_without_daemon_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "alsd", "status", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 1
    sock = tmp_path / "none.sock"
    assert r.stderr == (
        f"alsd status: alsd is not running (no socket at {sock}); start it with "
        "`systemctl start alsd`, or pass --config/--socket\n"
    )


def test_write_config_is_valid(tmp_path: Path) -> None:
    from alsd import config

    path = write_config(
        tmp_path / "a.toml",
        mountpoint=tmp_path / "m",
        state_dir=tmp_path / "s",
        control_socket=tmp_path / "c.sock",
        settings={"fetch.concurrency": 2},
    )
    cfg = config.load(str(path))
    assert cfg.fetch.concurrency == 2 and cfg.mountpoint == str(tmp_path / "m")


def test_unmount_helper_refuses_nothing(tmp_path: Path) -> None:
    unmount(tmp_path)  # not a mount: nothing to do, and no error


@pytest.mark.fuse
def test_sd_notify_ready_and_stopping(tmp_path: Path) -> None:
    import socket

    addr = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(addr)
        s.settimeout(60)
        p = start_alsd(tmp_path, env={"NOTIFY_SOCKET": addr})
        try:
            assert s.recv(256) == b"READY=1"
            p.stop()
            assert s.recv(256) == b"STOPPING=1"
        finally:
            p.cleanup()


@pytest.mark.fuse
@pytest.mark.registry
def test_unknown_size_fallback_lets_podman_pull(
    tmp_path: Path,
    registry: RegistryServer,  # noqa: F811
    fixtures: Path,
) -> None:
    # zstdchunked-podman43 has neither an uncompressed-size annotation nor a tar-split.
    ref = registry.push_fixture("zstdchunked-podman43")
    la = OciLayout(fixtures / "images").image("zstdchunked-podman43").layers[0]
    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    p = start_alsd(
        tmp_path, registries_conf=conf, settings={"layers.unknown_diff_size": "fallback"}
    )
    try:
        d = p.layer_dir(ref, la.digest)
        for name in ("diff", "info"):
            with pytest.raises(FileNotFoundError):
                os.stat(d / name)
        p.stop()
    finally:
        p.cleanup()


@pytest.mark.fuse
def test_non_empty_mountpoint_is_refused(tmp_path: Path) -> None:
    """Mounting over a directory with files in it would hide them (a mistyped mountpoint
    such as podman's own storage, or the state dir): refuse with a message naming it."""
    mnt = tmp_path / "store"
    mnt.mkdir()
    (mnt / "precious").write_text("x")
    p = start_alsd(tmp_path / "w", mountpoint=mnt, wait=False)
    try:
        rc = p.wait_exit()
        assert rc == 1
        assert not os.path.ismount(mnt)
        assert f"{mnt}: not empty" in p.log()
        assert (mnt / "precious").read_text() == "x"
    finally:
        p.cleanup()


@pytest.mark.fuse
def test_sigterm_does_not_wait_for_a_hung_lookup(tmp_path: Path) -> None:
    """A lookup waiting on a registry that never answers must not hold the shutdown for
    the whole resolve timeout (systemd would SIGKILL and leave a dead mount): in-flight
    requests get a short grace, then an error, and the daemon unmounts and exits 0."""
    import base64
    import signal
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections complete in the backlog and are never answered
    ref = f"127.0.0.1:{silent.getsockname()[1]}/x/y:latest"
    settings = {"fetch.resolve_timeout_s": 600.0, "fetch.request_timeout_s": 600.0}
    p = start_alsd(tmp_path, settings=settings)
    try:
        diff = p.mountpoint / base64.b64encode(ref.encode()).decode() / ("sha256:" + "1" * 64)
        code = f"import os\ntry:\n    os.stat({str(diff / 'diff')!r})\nexcept OSError as e:\n"
        code += "    print(e.errno)\n"
        stat = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while p.status()["resolving"] == 0:
            assert stat.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        p.signal(signal.SIGTERM)
        assert p.wait_exit(timeout_s=60) == 0, p.log_tail()
        out, _ = stat.communicate(timeout=60)
        assert out.strip() and int(out) != 0  # an errno, not success and not a hang
        assert not os.path.ismount(p.mountpoint)
    finally:
        silent.close()
        p.cleanup()


async def test_the_pyfuse3_shutdown_race_is_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reproduces pyfuse3.asyncio's race directly (it depends on kernel timing through a
    real mount): a reader callback ``set_result`` on a future terminate() already failed."""
    import asyncio

    from alsd.app.daemon import loop_exception_handler

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_exception_handler)
    fut: asyncio.Future[None] = loop.create_future()
    fut.set_exception(RuntimeError("closing"))
    fut.exception()
    with caplog.at_level("DEBUG"):
        loop.call_soon(fut.set_result, None)
        loop.call_soon(lambda: 1 / 0)  # any other callback error is still reported
        for _ in range(3):
            await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "ZeroDivisionError" in str(errors[0].exc_info)
