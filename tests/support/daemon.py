"""Run the real alsd daemon in a subprocess for tests (real FUSE mount, real syscalls).

pyfuse3 keeps one FUSE session per process, so the daemon never runs inside pytest::

    from tests.support.daemon import running_alsd

    with running_alsd(tmp_path, registries_conf=reg.write_registries_conf(tmp_path / "r.conf")
                      ) as alsd:
        alsd.mountpoint                 # Path, mounted (os.path.ismount) when entered
        alsd.layer_dir(ref, digest)     # <mountpoint>/<base64(ref)>/<digest>
        alsd.status()                   # GET /status over the control socket, as a dict
        alsd.metrics()                  # GET /metrics text
        alsd.stop()                     # SIGTERM, wait, assert exit 0 and no mount left
    # leaving the block stops it (SIGTERM, then SIGKILL) and lazily unmounts if needed

``start_alsd(workdir, ...)`` returns an :class:`AlsdProcess` you must ``stop()`` or
``cleanup()`` yourself; ``write_config(path, ...)`` writes the alsd.toml it uses (every
test-relevant setting can be overridden through ``settings``, a dict of dotted keys such as
``{"prefetch.background": False}``). The daemon's stderr goes to ``<workdir>/alsd.log``;
:meth:`AlsdProcess.log` reads it (failures include its tail).

Waiting is always polling with a deadline plus a check that the process is still alive;
nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[2]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_config(
    path: Path,
    *,
    mountpoint: Path,
    state_dir: Path,
    control_socket: Path,
    registries_conf: Path | None = None,
    auth_file: Path | None = None,
    log_level: str = "debug",
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write an alsd.toml for a test; ``settings`` adds/overrides dotted keys."""
    values: dict[str, Any] = {
        "mountpoint": str(mountpoint),
        "state_dir": str(state_dir),
        "log_level": log_level,
        "control.socket": str(control_socket),
        # Tests compare what they read, not what a background fetch did meanwhile.
        "prefetch.background": False,
        # ... and what the FUSE tree serves: a layer read whole would otherwise be
        # materialised and its diff become a symlink (tests of that turn it on).
        "layers.materialize": False,
        "layers.negative_cache_ttl_s": 1.0,
    }
    if registries_conf is not None:
        values["registry.registries_conf"] = str(registries_conf)
    if auth_file is not None:
        values["registry.auth_file"] = str(auth_file)
    values.update(settings or {})
    top = {k: v for k, v in values.items() if "." not in k}
    tables: dict[str, dict[str, Any]] = {}
    for k, v in values.items():
        if "." in k:
            table, _, key = k.partition(".")
            tables.setdefault(table, {})[key] = v
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for table, kv in tables.items():
        lines.append(f"\n[{table}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in kv.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("alsd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def control_request(
    sock_path: Path, method: str, url: str, body: bytes | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    conn = _UnixHTTPConnection(str(sock_path), timeout)
    try:
        conn.request(method, url, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def unmount(mountpoint: Path) -> None:
    """``fusermount3 -u -z`` and assert that nothing is mounted there any more."""
    if os.path.ismount(mountpoint) or _dead_mount(mountpoint):
        r = subprocess.run(
            ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, text=True
        )
        assert r.returncode == 0, f"fusermount3 -u -z {mountpoint}: {r.stderr}"
    assert not os.path.ismount(mountpoint), f"{mountpoint} still mounted"


def _dead_mount(mountpoint: Path) -> bool:
    try:
        os.stat(mountpoint)
    except OSError as exc:
        import errno

        return exc.errno == errno.ENOTCONN
    return False


@dataclass
class AlsdProcess:
    proc: subprocess.Popen[bytes]
    workdir: Path
    config_path: Path
    mountpoint: Path
    state_dir: Path
    control_socket: Path
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 6000) -> str:
        return self.log()[-n:]

    def wait_mounted(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll until the mountpoint is a mount and the control socket answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"alsd exited with {rc} before mounting:\n{self.log_tail()}")
            if os.path.ismount(self.mountpoint) and self.control_socket.exists():
                with contextlib.suppress(OSError):
                    status, _ = control_request(self.control_socket, "GET", "/status")
                    if status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"alsd did not mount within {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def layer_dir(self, ref: str, digest: str) -> Path:
        import base64

        return self.mountpoint / base64.b64encode(ref.encode()).decode() / digest

    def status(self) -> dict[str, Any]:
        status, body = control_request(self.control_socket, "GET", "/status")
        assert status == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def metrics(self) -> str:
        status, body = control_request(self.control_socket, "GET", "/metrics")
        assert status == 200, body
        return body.decode()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"alsd did not exit within {timeout_s}s:\n{self.log_tail()}"
            ) from None

    def stop(self) -> None:
        """SIGTERM; assert exit status 0 and that no mount is left behind."""
        self.signal(signal.SIGTERM)
        rc = self.wait_exit()
        assert rc == 0, f"alsd exited with {rc}:\n{self.log_tail()}"
        assert not os.path.ismount(self.mountpoint), "SIGTERM left the mount behind"

    def kill(self) -> None:
        """SIGKILL (leaves a dead mount behind, as a crash would)."""
        self.signal(signal.SIGKILL)
        self.wait_exit()

    def cleanup(self) -> None:
        """Whatever state it is in: stop the process and remove any mount."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        unmount(self.mountpoint)


def alsd_command(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "alsd", "--config", str(config_path), *extra]


def start_alsd(
    workdir: Path,
    *,
    registries_conf: Path | None = None,
    auth_file: Path | None = None,
    settings: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    config_path: Path | None = None,
    mountpoint: Path | None = None,
) -> AlsdProcess:
    """Start ``python -m alsd --config <workdir>/alsd.toml`` (written unless it exists)."""
    workdir.mkdir(parents=True, exist_ok=True)
    mnt = mountpoint or workdir / "store"
    state = workdir / "state"
    sock = workdir / "run" / "alsd.sock"
    cfg = config_path or workdir / "alsd.toml"
    if not cfg.exists():
        write_config(
            cfg,
            mountpoint=mnt,
            state_dir=state,
            control_socket=sock,
            registries_conf=registries_conf,
            auth_file=auth_file,
            settings=settings,
        )
    log_path = workdir / "alsd.log"
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            alsd_command(cfg), stdout=log, stderr=log, env=full_env, cwd=str(workdir)
        )
    p = AlsdProcess(proc, workdir, cfg, mnt, state, sock, log_path)
    if wait:
        try:
            p.wait_mounted()
        except BaseException:
            p.cleanup()
            raise
    return p


@contextlib.contextmanager
def running_alsd(workdir: Path, **kwargs: Any) -> Iterator[AlsdProcess]:
    p = start_alsd(workdir, **kwargs)
    try:
        yield p
    finally:
        p.cleanup()


def have_fusermount() -> bool:
    return shutil.which("fusermount3") is not None
