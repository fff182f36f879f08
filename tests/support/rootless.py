"""Rootless podman with alsd run by the same unprivileged user, as ``contrib/rootless.md``
describes: alsd inside podman's user and mount namespaces, its store, state and control
socket under the user's directories, podman's ``additionallayerstores`` in the user's
``~/.config/containers/storage.conf``.

The user (``alsd-rootless``, ``ALSD_ROOTLESS_USER`` overrides) is made by the tests when
missing (``useradd``, with sub-UID/GID ranges; idempotent) and is the tests' own: its
podman configuration and storage are rewritten and reset by every use. One test session
at a time uses it (an flock in its home directory).

Generations, as in ``tests.support.podman``: ``"host"`` is the machine's podman, and alsd
starts with ``podman unshare python3 -m alsd ...`` exactly as the document says;
``"other"`` is the chroot's podman (``ALSD_OTHER_PODMAN_ROOT``), run as the user in a
mount namespace whose root is the chroot (``pivot_root``, not ``chroot``: the kernel
refuses a user namespace to a chrooted process), with alsd started the same way on the
chroot's Python and Debian's packages of its dependencies (``.ci/build-chroot`` installs
them).

On the host, alsd runs as the user on the system's python3 from a copy of the package and
of this virtualenv's run-time dependencies (the clone and its virtualenv need not be
readable by other users). Opening ``/dev/fuse`` inside a user
namespace needs it to be world-accessible, as udev makes it on a standard Debian
(mode 0666); where it is not (a machine without udev) the fixture sets 0666 for the
session and restores the mode afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.markers import Marker

from tests.support.daemon import control_request

USER_ENV = "ALSD_ROOTLESS_USER"
DEFAULT_USER = "alsd-rootless"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_TIMEOUT_S = 60.0
TIMEOUT_S = 300.0
REPO = Path(__file__).resolve().parents[2]

OLD_ROOT = ".alsd-old-root"
PIVOT_ROOT = (
    f'cd "$1" && shift && pivot_root . {OLD_ROOT} && umount -l /{OLD_ROOT} && cd / && exec "$@"'
)

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
"""


def user_name() -> str:
    return os.environ.get(USER_ENV, DEFAULT_USER)


def rootless_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the rootless tests create and switch to a test user (run as root)"
    system = subprocess.run(
        ["python3", "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True, text=True, check=False, env={"PATH": PATH},
    ).stdout.split()  # fmt: skip
    if system != [str(v) for v in sys.version_info[:2]]:
        here = ".".join(map(str, sys.version_info[:2]))
        return (
            f"alsd runs as the test user on the system's python3 ({'.'.join(system)}) with "
            f"this virtualenv's packages, made for Python {here}"
        )
    for tool in ("useradd", "usermod", "setpriv", "unshare", "newuidmap"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install uidmap util-linux passwd)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


def _next_free_range(path: Path) -> int:
    end = 100000
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                end = max(end, int(parts[1]) + int(parts[2]))
    return end


def ensure_user() -> pwd.struct_passwd:
    """The test user, with a home and sub-UID/GID ranges (made if missing; idempotent)."""
    name = user_name()
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", "--comment",
             "alsd rootless tests", name],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        pw = pwd.getpwnam(name)
    for f, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        lines = Path(f).read_text().splitlines() if Path(f).exists() else []
        if not any(line.split(":")[0] in (name, str(pw.pw_uid)) for line in lines):
            start = _next_free_range(Path(f))
            subprocess.run(
                ["usermod", flag, f"{start}-{start + 65535}", name],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
    home = Path(pw.pw_dir)
    home.mkdir(mode=0o755, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    return pw


def mirror_user_into(root: Path, pw: pwd.struct_passwd) -> None:
    """Give a chroot the user's passwd/group/subuid/subgid lines and home (idempotent)."""
    for f, field_no, value in (
        ("passwd", 0, pw.pw_name),
        ("group", 2, str(pw.pw_gid)),
        ("subuid", 0, pw.pw_name),
        ("subgid", 0, pw.pw_name),
    ):
        lines = [
            ln for ln in Path(f"/etc/{f}").read_text().splitlines()
            if ln.split(":")[field_no : field_no + 1] == [value]
        ]  # fmt: skip
        target = root / "etc" / f
        have = target.read_text().splitlines() if target.exists() else []
        names = {ln.split(":")[0] for ln in have}
        new = [ln for ln in lines if ln.split(":")[0] not in names]
        if new:
            with target.open("a") as out:
                out.write("".join(ln + "\n" for ln in new))
    home = root / pw.pw_dir.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)


def _requirement_closure(top: str) -> list[importlib.metadata.Distribution]:
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [top]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = importlib.metadata.distribution(name)
        seen[key] = dist
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if marker and not Marker(marker).evaluate({"extra": ""}):
                continue
            m = re.match(r"[A-Za-z0-9_.-]+", spec)
            assert m is not None, req
            todo.append(m[0])
    return [d for k, d in seen.items() if k != "alsd"]


def install_copy(dest: Path, uid: int, gid: int, *, dependencies: bool = True) -> Path:
    """Copy the alsd package and (unless told otherwise) its run-time dependencies from
    this virtualenv (not the test tools) to ``dest``, owned by the user; returns ``dest``,
    the directory to put on PYTHONPATH."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for dist in _requirement_closure("alsd") if dependencies else []:
        for f in dist.files or []:
            src = Path(str(dist.locate_file(f)))
            if str(f).startswith("..") or "__pycache__" in f.parts or not src.is_file():
                continue
            target = dest / f
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    shutil.copytree(REPO / "alsd", dest / "alsd", ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, dirnames, filenames in os.walk(dest):
        for n in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, n), uid, gid)
    os.chown(dest, uid, gid)
    return dest


@contextlib.contextmanager
def world_accessible_fuse() -> Iterator[None]:
    """/dev/fuse mode 0666 (what udev sets on a standard Debian) while in the block."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 == 0o006:
        yield
        return
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@dataclass
class RootlessEnv:
    """The test user's podman (host or chroot) and alsd in that podman's namespaces."""

    generation: str
    pw: pwd.struct_passwd
    chroot: Path | None
    pythonpath: str  # as the user's podman sees it
    version: str = ""
    alsd_proc: subprocess.Popen[bytes] | None = None
    _lock_fd: int | None = field(default=None, repr=False)

    # ---- paths: "user" paths are what the user's podman sees; host paths are ours
    @property
    def home(self) -> str:
        return self.pw.pw_dir

    @property
    def runtime_dir(self) -> str:
        return f"/run/user/{self.pw.pw_uid}"

    def host(self, user_path: str) -> Path:
        return Path(user_path) if self.chroot is None else self.chroot / user_path.lstrip("/")

    @property
    def mountpoint(self) -> str:
        return f"{self.home}/.local/share/alsd/store"

    @property
    def state_dir(self) -> str:
        return f"{self.home}/.local/share/alsd"

    @property
    def socket(self) -> Path:
        # alsd runs on the host's filesystem view: the host path of the socket.
        return self.host(f"{self.runtime_dir}/alsd/alsd.sock")

    @property
    def graphroot(self) -> Path:
        return self.host(f"{self.home}/.local/share/containers/storage")

    @property
    def alsd_log(self) -> Path:
        return self.host(f"{self.state_dir}.log")

    def env(self) -> dict[str, str]:
        return {
            "PATH": PATH,
            "HOME": self.home,
            "USER": self.pw.pw_name,
            "XDG_RUNTIME_DIR": self.runtime_dir,
            "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
        }

    def _as_user(self, argv: list[str], env: dict[str, str]) -> list[str]:
        setpriv = ["setpriv", f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}",
                   "--init-groups", "env", "-i", *(f"{k}={v}" for k, v in env.items())]  # fmt: skip
        if self.chroot is None:
            return [*setpriv, *argv]
        # Not chroot(2): the kernel refuses a user namespace to a chrooted process
        # (user_namespaces(7): EPERM), and rootless podman needs one. A mount namespace
        # whose root *is* the chroot (pivot_root) is not "chrooted".
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", PIVOT_ROOT,
                "sh", str(self.chroot), *setpriv, *argv]  # fmt: skip

    def run_as_user(
        self, argv: list[str], extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._as_user(argv, {**self.env(), **(extra_env or {})}),
            capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
            cwd=str(self.host(self.home)), env={"PATH": PATH},
        )  # fmt: skip

    def podman(
        self, *args: str, check: bool = True, timeout: float = TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        cmd = self._as_user(["podman", *args], self.env())
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False,
            cwd=str(self.host(self.home)), env={"PATH": PATH},
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} (as {self.pw.pw_name}, {self.generation}) exited "
                f"{r.returncode}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}\n"
                f"--- alsd log:\n{self.alsd_log_tail()}"
            )
        return r

    def alsd_log_tail(self, n: int = 4000) -> str:
        try:
            return self.alsd_log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ---- setup
    def _write_as_user(self, user_path: str, text: str) -> None:
        p = self.host(user_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.chown(p, self.pw.pw_uid, self.pw.pw_gid)

    def setup(self, registries_conf: str) -> None:
        uid, gid = self.pw.pw_uid, self.pw.pw_gid
        home = self.host(self.home)
        fd = os.open(home / ".alsd-tests.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd
        # Whatever a previous (interrupted) run left: its podman state and configs.
        self.podman("system", "migrate", check=False)
        self.podman("system", "reset", "--force", check=False)
        for d in (".config", ".local", ".cache"):
            shutil.rmtree(home / d, ignore_errors=True)
        rt = self.host(self.runtime_dir)
        shutil.rmtree(rt, ignore_errors=True)
        rt.mkdir(mode=0o700, parents=True)
        os.chown(rt, uid, gid)
        for d in (self.mountpoint, f"{self.runtime_dir}/alsd", f"{self.home}/.config/containers"):
            p = self.host(d)
            p.mkdir(parents=True, exist_ok=True)
            q = p
            while q != home and q != rt:
                os.chown(q, uid, gid)
                q = q.parent
        # The files contrib/rootless.md tells the user to write.
        self._write_as_user(f"{self.home}/.config/alsd.toml", self.alsd_toml(lambda p: p))
        self._write_as_user(
            f"{self.home}/.config/containers/storage.conf",
            '[storage]\ndriver = "overlay"\n\n[storage.options]\n'
            f'additionallayerstores = ["{self.mountpoint}:ref"]\n',
        )
        self._write_as_user(f"{self.home}/.config/containers/registries.conf", registries_conf)
        self._write_as_user(f"{self.home}/.config/containers/containers.conf", CONTAINERS_CONF)
        self._write_as_user(f"{self.home}/.config/containers/auth.json", '{"auths": {}}\n')
        self.version = self.podman("--version").stdout.split()[-1]

    def alsd_toml(self, path: Callable[[str], Any]) -> str:
        """The user's alsd.toml, with every path passed through ``path``."""
        conf = f"{self.home}/.config/containers"
        return (
            f'mountpoint = "{path(self.mountpoint)}"\n'
            f'state_dir = "{path(self.state_dir)}"\n'
            'log_level = "debug"\n\n'
            f'[control]\nsocket = "{path(f"{self.runtime_dir}/alsd/alsd.sock")}"\n\n'
            f'[registry]\nregistries_conf = "{path(f"{conf}/registries.conf")}"\n'
            f'auth_file = "{path(f"{conf}/auth.json")}"\n\n'
            "[prefetch]\nbackground = false\n"
        )

    # ---- alsd
    def start_alsd(self) -> None:
        """``podman unshare python3 -m alsd --config ~/.config/alsd.toml``, as the user."""
        # The system's python3 (the user cannot read this virtualenv's interpreter, which
        # may live in root's home); the copied dependencies need the same minor version.
        python = "python3"
        env = {**self.env(), "PYTHONPATH": self.pythonpath}
        cmd = self._as_user(
            ["podman", "unshare", python, "-m", "alsd", "--config",
             f"{self.home}/.config/alsd.toml"],
            env,
        )  # fmt: skip
        with open(self.alsd_log, "ab") as log:
            self.alsd_proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, cwd=str(self.host(self.home)), env={"PATH": PATH}
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.alsd_proc.poll() is not None:
                raise AssertionError(
                    f"alsd exited with {self.alsd_proc.returncode}:\n{self.alsd_log_tail()}"
                )
            if self.socket.exists():
                with contextlib.suppress(OSError):
                    status, _ = control_request(self.socket, "GET", "/status")
                    if status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"alsd did not start:\n{self.alsd_log_tail()}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        code, body = control_request(self.socket, "GET", "/status")
        assert code == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def stop_alsd(self) -> None:
        proc = self.alsd_proc
        if proc is None:
            return
        self.alsd_proc = None
        # SIGTERM to alsd itself: with `podman unshare` it is podman's child.
        for pid in [*_descendants(proc.pid), proc.pid]:
            if "alsd" in _cmdline(pid) and "podman" not in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()

    def teardown(self) -> None:
        self.stop_alsd()
        self.podman("system", "reset", "--force", check=False)
        self.podman("system", "migrate", check=False)  # stops the pause process
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{t}/children").read_text().split():
                out.append(int(child))
                out.extend(_descendants(int(child)))
    return out
