"""Run real CRI-O (crio + crictl) against alsd, with configs and state of its own.

Debian packages neither CRI-O nor crictl: a build of both (CRI-O 1.33, containers/storage
1.58, crictl 1.33) lies beside the clone in ``../shared/tools/cri-o/`` as one tarball
(``ALSD_CRIO_TOOLS`` overrides the directory). ``crio`` links glibc >= 2.38, so:

* on Debian 13 (glibc 2.41) it runs on the host;
* on Debian 12 (glibc 2.36) it runs inside the Debian 13 chroot that ``.ci/build-chroot``
  builds (``ALSD_OTHER_PODMAN_ROOT``), which also holds what crio needs at run time
  (conmon, runc, containernetworking-plugins, libseccomp2, libsqlite3-0). The chroot is
  mounted exactly as for the other podman generation (``tests.support.podman``); the
  work directory lies inside it, so alsd, running on the host, mounts its store where
  crio sees it.

Nothing under ``/etc`` is touched: crio gets ``--config``, ``--config-dir``,
``--registries-conf`` and ``$CONTAINERS_STORAGE_CONF`` of its own; its storage options
come only from the drop-ins the test passes (``contrib/crio/`` in the tests). crictl is
static and runs on the host against crio's socket.

Fixture ``crio_factory`` (``pytest_plugins = ["tests.support.crio"]``):
``crio_factory.workdir()`` is a fresh directory crio can see (mount alsd under it);
``crio_factory(workdir, dropins={name: text}, global_auth_file=None, registries=(),
auth_helper=None)`` writes the
configs, imports a stand-in pause image, starts crio and returns a :class:`Crio`. Every
crio it started is stopped at the end of the test (pods removed, crio SIGTERMed, mounts
under its state unmounted, its cgroups removed, the directory deleted).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fixtures_dir
from tests.support.podman import (
    OTHER_ROOT_ENV,
    _mounts_under,
    _umount,
    other_root_unavailable,
)

TOOLS_ENV = "ALSD_CRIO_TOOLS"
TARBALL = "cri-o-v1.33.13-bin.tar.xz"
# crio is linked against glibc 2.38's symbols (the build's README).
CRIO_GLIBC = (2, 38)
# What crio needs at run time besides itself (the build's README).
CRIO_PACKAGES = ("conmon", "runc", "containernetworking-plugins", "libseccomp2", "libsqlite3-0")
START_TIMEOUT_S = 60.0
CRICTL_TIMEOUT_S = 180.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CRIO_CONF = """\
[crio]
root = "{d}/state/root"
runroot = "{d}/state/runroot"
log_dir = "{d}/state/log/pods"
version_file = "{d}/state/run/version"
version_file_persist = "{d}/state/version-persist"
clean_shutdown_file = "{d}/state/clean.shutdown"

[crio.api]
listen = "{d}/run/crio.sock"
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
cgroup_manager = "cgroupfs"
conmon_cgroup = "pod"
default_runtime = "runc"
pinns_path = "{d}/bin/pinns"
namespaces_dir = "{d}/state/ns"
container_exits_dir = "{d}/state/run/exits"
container_attach_socket_dir = "{d}/state/run/attach"
drop_infra_ctr = true
default_ulimits = ["nofile=1024:1024"]

[crio.runtime.runtimes.runc]
runtime_path = "/usr/sbin/runc"
runtime_type = "oci"
runtime_root = "{d}/state/run/runc"
monitor_path = "/usr/bin/conmon"
monitor_cgroup = "pod"

[crio.image]
signature_policy = "{d}/policy.json"
pause_image = "localhost/pause:local"
{image_extra}
[crio.network]
network_dir = "{d}/cni/"
plugin_dirs = ["/usr/lib/cni"]

[crio.nri]
enable_nri = false
"""

# The storage.conf crio reads ($CONTAINERS_STORAGE_CONF): driver and paths only, so that
# an Additional Layer Store can only come from the drop-ins under test.
STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{d}/state/root"
runroot = "{d}/state/runroot"
"""


def tools_dir() -> Path:
    """``../shared/tools/cri-o`` beside the clone: the sibling of the fixtures directory."""
    return Path(os.environ.get(TOOLS_ENV, fixtures_dir().parent / "tools" / "cri-o"))


def _glibc() -> tuple[int, int]:
    name = os.confstr("CS_GNU_LIBC_VERSION") or "glibc 0.0"
    major, minor = name.split()[1].split(".")[:2]
    return int(major), int(minor)


def _missing_packages(root: Path | None) -> list[str]:
    base = [] if root is None else ["chroot", str(root)]
    missing = []
    for p in CRIO_PACKAGES:
        r = subprocess.run(
            [*base, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}", p],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if not r.stdout.startswith("ii"):
            missing.append(p)
    return missing


def where_crio_runs() -> tuple[Path | None, str | None]:
    """(chroot or None for the host, None) where crio can run, or (None, why it cannot)."""
    if os.geteuid() != 0:
        return None, "CRI-O runs as root"
    if not (tools_dir() / TARBALL).is_file():
        return None, f"no CRI-O build at {tools_dir() / TARBALL} (set {TOOLS_ENV})"
    if _glibc() >= CRIO_GLIBC:
        missing = _missing_packages(None)
        if missing:
            return None, f"crio needs {' '.join(missing)} (apt-get install; .ci/run does)"
        if shutil.which("podman") is None:
            return None, "podman is needed to import the stand-in pause image"
        return None, None
    reason = other_root_unavailable()
    if reason is not None:
        return None, f"crio needs glibc >= 2.38, this host has {_glibc()}: {reason}"
    root = Path(os.environ[OTHER_ROOT_ENV])
    missing = _missing_packages(root)
    if missing:
        return None, f"the chroot {root} lacks {' '.join(missing)} (rerun .ci/build-chroot)"
    return root, None


def crio_unavailable() -> str | None:
    return where_crio_runs()[1]


def _toml_str(s: str) -> str:
    return json.dumps(s)


@dataclass
class Crio:
    """One running crio with its own configs, state and socket under ``dir``."""

    dir: Path  # host path
    chroot: Path | None
    proc: subprocess.Popen[bytes] | None = None
    cgroup_parent: str = field(default_factory=lambda: f"/alsd-crio-{uuid.uuid4().hex[:8]}")
    _pods: int = 0

    def path(self, host_path: Path | str) -> str:
        """The path crio sees for a host path."""
        p = Path(host_path)
        if self.chroot is None:
            return str(p)
        return "/" + str(p.resolve().relative_to(self.chroot.resolve()))

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "crio.sock"

    @property
    def graphroot(self) -> Path:
        return self.dir / "state" / "root"

    @property
    def log_path(self) -> Path:
        return self.dir / "crio.log"

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _in_root(self, *argv: str) -> list[str]:
        return list(argv) if self.chroot is None else ["chroot", str(self.chroot), *argv]

    def setup(
        self,
        dropins: Mapping[str, str],
        global_auth_file: Path | None,
        registries: tuple[str, ...],
        auth_helper: str | None = None,
    ) -> None:
        d = self.path(self.dir)
        for sub in ("bin", "run", "state", "cni", "crio.conf.d", "registries.conf.d", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        with tarfile.open(tools_dir() / TARBALL) as tf:
            for name in ("crio", "pinns", "crictl"):
                member = tf.getmember(name)
                member.name = name
                tf.extract(member, self.dir / "bin", filter="data")
        image_extra = ""
        if global_auth_file is not None:
            image_extra = f"global_auth_file = {_toml_str(self.path(global_auth_file))}\n"
        (self.dir / "crio.conf").write_text(CRIO_CONF.format(d=d, image_extra=image_extra))
        for name, text in dropins.items():
            (self.dir / "crio.conf.d" / name).write_text(text)
        (self.dir / "storage.conf").write_text(STORAGE_CONF.format(d=d))
        (self.dir / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
        (self.dir / "cni" / "10-lo.conflist").write_text(
            '{"cniVersion": "1.0.0", "name": "lo", "plugins": [{"type": "loopback"}]}\n'
        )
        reg = ["unqualified-search-registries = []"]
        if auth_helper is not None:
            reg.append(f"additional-layer-store-auth-helper = {_toml_str(auth_helper)}")
        for loc in dict.fromkeys(["127.0.0.1", "localhost", *registries]):
            reg += ["", "[[registry]]", f"location = {_toml_str(loc)}", "insecure = true"]
        (self.dir / "registries.conf").write_text("\n".join(reg) + "\n")
        (self.dir / "crictl.yaml").write_text("")
        self._import_pause()

    def _import_pause(self) -> None:
        """crio resolves its pause image even with drop_infra_ctr: give it an empty one,
        imported by podman into crio's store (there is no network to pull one)."""
        empty = self.dir / "empty.tar"
        with tarfile.open(empty, "w"):
            pass
        (self.dir / "podman-tmp").mkdir(exist_ok=True)
        env = {
            "PATH": PATH,
            "HOME": self.path(self.dir),
            "TMPDIR": self.path(self.dir / "podman-tmp"),
            "CONTAINERS_STORAGE_CONF": self.path(self.dir / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": self.path(self.dir / "registries.conf"),
            "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
        }
        cmd = self._in_root(
            "podman", "--events-backend", "none", "--tmpdir", self.path(self.dir / "podman-tmp"),
            "import", "--change", 'CMD ["/pause"]', self.path(empty), "localhost/pause:local",
        )  # fmt: skip
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"

    def start(self) -> None:
        d = self.dir
        env = {
            "PATH": PATH,
            "HOME": self.path(d),
            "CONTAINERS_STORAGE_CONF": self.path(d / "storage.conf"),
        }
        cmd = self._in_root(
            self.path(d / "bin" / "crio"),
            "--config", self.path(d / "crio.conf"),
            "--config-dir", self.path(d / "crio.conf.d"),
            "--registries-conf", self.path(d / "registries.conf"),
            "--registries-conf-dir", self.path(d / "registries.conf.d"),
            "--log-level", "debug",
        )  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"crio exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                r = self.crictl("version", check=False, timeout=10)
                if r.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"crio not ready after {START_TIMEOUT_S}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def crictl(
        self, *args: str, check: bool = True, timeout: float = CRICTL_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        # In crio's root, like a kubelet beside it: `crictl logs` reads the log file itself.
        endpoint = f"unix://{self.path(self.socket)}"
        cmd = self._in_root(
            self.path(self.dir / "bin" / "crictl"), "--config", self.path(self.dir / "crictl.yaml"),
            "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
            "--timeout", f"{int(timeout)}s", *args,
        )  # fmt: skip
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout + 30, check=False,
            env={"PATH": PATH, "HOME": self.path(self.dir)},
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(
                f"crictl {' '.join(args)} exited {r.returncode}\nstdout: {r.stdout[-3000:]}\n"
                f"stderr: {r.stderr[-3000:]}\n--- crio log:\n{self.log_tail(4000)}"
            )
        return r

    def run_container(self, image: str, command: list[str] | None = None) -> str:
        """runp + create + start ``image`` in a fresh pod; wait for it to exit; return its
        output (crictl logs). The pod is removed afterwards."""
        self._pods += 1
        name = f"p{self._pods}"
        logdir = self.dir / "logs" / name
        logdir.mkdir(parents=True)
        ns = {"namespace_options": {"network": 2, "pid": 1}}
        pod = {
            "metadata": {"name": name, "namespace": "alsd", "uid": uuid.uuid4().hex},
            "log_directory": self.path(logdir),
            "linux": {"cgroup_parent": self.cgroup_parent, "security_context": ns},
        }
        ctr: dict[str, Any] = {
            "metadata": {"name": "c"},
            "image": {"image": image},
            "log_path": "c.log",
            "linux": {"security_context": ns},
        }
        if command is not None:
            ctr["command"] = command
        (logdir / "pod.json").write_text(json.dumps(pod))
        (logdir / "ctr.json").write_text(json.dumps(ctr))
        pod_json, ctr_json = self.path(logdir / "pod.json"), self.path(logdir / "ctr.json")
        pod_id = self.crictl("runp", pod_json).stdout.strip()
        try:
            ctr_id = self.crictl("create", pod_id, ctr_json, pod_json).stdout.strip()
            self.crictl("start", ctr_id)
            deadline = time.monotonic() + CRICTL_TIMEOUT_S
            while True:
                state = json.loads(self.crictl("inspect", "-o", "json", ctr_id).stdout)
                if state["status"]["state"] == "CONTAINER_EXITED":
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"container {ctr_id} still running: {state['status']}")
                time.sleep(0.1)
            exit_code = state["status"]["exitCode"]
            logs = self.crictl("logs", ctr_id)
            out = logs.stdout + logs.stderr
            assert exit_code == 0, f"container exited {exit_code}: {out}"
            return out
        finally:
            self.crictl("stopp", pod_id, check=False)
            self.crictl("rmp", "-f", pod_id, check=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.crictl("rmp", "-fa", check=False, timeout=60)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Layer, container and namespace mounts crio left (never the ALS: it is elsewhere).
        for _ in range(4):
            mounts = _mounts_under(self.dir / "state")
            if not mounts:
                break
            for m in mounts:
                _umount(m)
        _remove_cgroup(self.cgroup_parent)


def _remove_cgroup(parent: str) -> None:
    """Remove ``parent`` (and what crio made below it) from every cgroup hierarchy."""
    base = Path("/sys/fs/cgroup")
    roots = [base] if (base / "cgroup.controllers").exists() else list(base.iterdir())
    for root in roots:
        top = root / parent.lstrip("/")
        if not top.is_dir():
            continue
        dirs = sorted((Path(p) for p, _, _ in os.walk(top)), key=lambda p: -len(p.parts))
        for d in dirs:
            with contextlib.suppress(OSError):
                d.rmdir()


class CrioFactory:
    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._crios: list[Crio] = []
        self._workdirs: list[Path] = []
        root, reason = where_crio_runs()
        if reason is not None:
            pytest.skip(reason)
        if root is not None:
            root = self._request.getfixturevalue("other_podman_root")
        self.chroot: Path | None = root

    def path(self, host_path: Path | str) -> str:
        """The path crio sees for a host path (inside the chroot, if crio runs in one)."""
        return Crio(Path("/"), self.chroot).path(host_path)

    def workdir(self) -> Path:
        # Short, directly under /tmp: unix socket paths (conmon's attach socket) are short.
        base = Path("/tmp") if self.chroot is None else self.chroot / "tmp"
        d = Path(tempfile.mkdtemp(prefix="alsd-crio-", dir=base))
        self._workdirs.append(d)
        return d

    def __call__(
        self,
        workdir: Path,
        *,
        dropins: Mapping[str, str],
        global_auth_file: Path | None = None,
        registries: tuple[str, ...] = (),
        auth_helper: str | None = None,
    ) -> Crio:
        """``auth_helper``: registries.conf's ``additional-layer-store-auth-helper``, a
        program as crio sees it."""
        c = Crio(workdir / "crio", self.chroot)
        self._crios.append(c)
        c.setup(dropins, global_auth_file, registries, auth_helper)
        c.start()
        return c

    def close(self) -> None:
        for c in reversed(self._crios):
            c.stop()
        for d in reversed(self._workdirs):
            if d.exists() and not _mounts_under(d):
                shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def crio_factory(request: pytest.FixtureRequest) -> Iterator[CrioFactory]:
    factory = CrioFactory(request)
    try:
        yield factory
    finally:
        factory.close()
