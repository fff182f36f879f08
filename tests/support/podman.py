"""Run real podman against a test-owned store, on both generations of the ALS protocol.

Nothing under /etc is touched: every :class:`PodmanEnv` writes its own containers.conf,
storage.conf and registries.conf into a private directory and points podman at them with
``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF`` and ``CONTAINERS_REGISTRIES_CONF``
(plus ``REGISTRY_AUTH_FILE``, so credentials never leak between tests).

Generations (spec.md §1.2, §1.11):

* ``"host"``: the machine's own podman (4.3.1 on Debian 12, 5.4.2 on Debian 13).
* ``"other"``: the other Debian release's podman, run as ``chroot DIR podman`` inside the
  debootstrap tree that ``.ci/build-chroot`` builds. ``DIR`` comes from the environment
  variable ``ALSD_OTHER_PODMAN_ROOT`` (``.ci/run`` and ``tests/run`` set it); tests that
  need it skip with a reason when it is unset or incomplete.

``PodmanEnv.protocol`` says which ALS protocol that podman speaks: ``"blob-digest"``
(podman < 5.1: layer directories named by the compressed blob digest) or
``"toc-digest"`` (podman >= 5.1: named by the TOC digest).

Fixtures (``pytest_plugins = ["tests.support.podman"]`` in the test module; importing the
fixture names instead trips ruff's F811 at every use):

``podman_env``
    A factory. ``podman_env(generation="host", als_mount=None, *, registries=(),
    auth_helper=None)`` returns a :class:`PodmanEnv`; everything it made is torn down
    at the end of the test (``podman system reset``, ``umount <graphroot>/overlay``,
    then the directory is deleted). ``podman_env.workdir(generation)`` returns a fresh
    empty directory that the given generation can see; mount the ALS (alsd, or a plain
    directory) somewhere under it, because a chroot only sees what lies inside it.

``podman_generation``
    Parametrised over ``"host"`` and ``"other"``; the ``"other"`` case skips when the
    chroot is not available. Use it to run one test on both generations.

``other_podman_root``
    Session fixture: the prepared chroot directory (bind-mounted onto itself, with
    ``/proc``, ``/sys`` and ``/dev`` rbind-mounted). Several pytest sessions may share
    one chroot: the bind mounts are made by whoever comes first and removed by whoever
    leaves last (an flock on ``DIR.lock`` counts the users).

A :class:`PodmanEnv` has ``.run(*args, check=True, timeout=300, input=None, env=None)
-> CompletedProcess[str]`` (stdout/stderr captured; with ``check`` a non-zero exit raises
AssertionError carrying podman's stderr), ``.version`` ("4.3.1"), ``.version_tuple``,
``.protocol``, ``.generation``, ``.graphroot`` / ``.runroot`` / ``.auth_file`` (host
paths; write credentials for podman into ``auth_file``), ``.env`` (the environment podman
runs with) and ``.command(*args)`` (the argv, for a Popen of your own).

The private directories live directly under /tmp (or the chroot's /tmp), not under
pytest's ``tmp_path``: with a runroot about 70 characters long, podman 4.3.1 waits 20 s
for every container to exit (the attach socket path no longer fits a unix socket
address). Keep that in mind for any store of your own.

Paths: ``PodmanEnv.podman_path(host_path)`` maps a host path to what podman sees (the
identity for ``"host"``), ``PodmanEnv.host_path(path)`` maps back (for example the
target of a ``diff`` symlink in the graphroot).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

OTHER_ROOT_ENV = "ALSD_OTHER_PODMAN_ROOT"
# Written last by .ci/build-chroot: a chroot without it is half-built.
CHROOT_MARKER = ".alsd-ci-complete"
GENERATIONS = ("host", "other")
# Generous: a pull over loopback takes seconds, but a hung FUSE op must not hang CI forever.
DEFAULT_TIMEOUT_S = 300.0

# environment.md: crun fails here ("cgroups in hybrid mode not supported") and podman's
# default ulimits exceed the hard limit. events_logger=none: there is no journald in the
# chroot, and an events file would be shared between stores. tmp_dir is per store so two
# stores never share libpod's "alive" lock and state.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "{tmp_dir}"
"""


def _toml_str(s: str) -> str:
    """A TOML basic string (the paths here never hold quotes, but do not trust that)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(i) for i in items) + "]"


def parse_version(text: str) -> tuple[int, int, int]:
    """``"podman version 4.3.1"`` (or ``"5.4.2"``) -> ``(4, 3, 1)``."""
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"cannot parse a podman version from {text!r}")
    return int(m[1]), int(m[2]), int(m[3])


def protocol_for(version: tuple[int, int, int]) -> str:
    """Which ALS protocol a podman version speaks (c/storage 1.54 came with podman 5.1)."""
    return "toc-digest" if version >= (5, 1, 0) else "blob-digest"


def other_root_unavailable() -> str | None:
    """Why the other generation's chroot cannot be used, or None when it can."""
    root = os.environ.get(OTHER_ROOT_ENV)
    if not root:
        return f"{OTHER_ROOT_ENV} is not set (run .ci/build-chroot; tests/run sets it)"
    if not (Path(root) / CHROOT_MARKER).exists():
        return f"{OTHER_ROOT_ENV}={root} is not a complete chroot (rebuild with .ci/build-chroot)"
    if os.geteuid() != 0:
        return "the podman chroot needs root"
    return None


def _mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below ``prefix``, deepest first (so they can be unmounted in order)."""
    found: list[Path] = []
    pre = str(prefix).rstrip("/")
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            target = line.split()[4].encode().decode("unicode_escape")
            if target == pre or target.startswith(pre + "/"):
                found.append(Path(target))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _is_mount_point(path: Path) -> bool:
    """Whether something is mounted exactly at ``path``.

    Not os.path.ismount: it compares device numbers with the parent, so a directory
    bind-mounted onto itself (the chroot's "/") does not count as a mount point for it.
    """
    return Path(path) in _mounts_under(path)


def _umount(path: Path) -> None:
    """Unmount, lazily if busy; a path that is no longer mounted is fine."""
    r = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
    if r.returncode != 0 and _is_mount_point(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class OtherRoot:
    """The shared, mounted chroot of the other podman generation (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        # Beside the chroot, not in it: an open file inside would keep the bind mount busy.
        fd = os.open(f"{self.root}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._lock_fd = fd
        # Exclusive while (maybe) setting up, then shared while in use: the last one out
        # is the only one that can take the lock exclusively again, and it unmounts.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if not _is_mount_point(self.root):
                self._mount()
        finally:
            fcntl.flock(fd, fcntl.LOCK_SH)

    def _mount(self) -> None:
        r = str(self.root)

        def sh(*cmd: str) -> None:
            subprocess.run(cmd, check=True, capture_output=True, text=True)

        # podman needs "/" to be a mount point (pivot_root). Private, so that the mounts
        # below neither propagate to the host's "/" nor receive the host's.
        sh("mount", "--bind", r, r)
        sh("mount", "--make-private", r)
        for d in ("proc", "sys", "dev"):
            sh("mount", "--rbind", f"/{d}", f"{r}/{d}")
            # rslave: an unmount under the chroot must never propagate back and unmount
            # the host's /dev/pts or /sys/fs/cgroup.
            sh("mount", "--make-rslave", f"{r}/{d}")

    def release(self) -> None:
        fd = self._lock_fd
        if fd is None:
            return
        self._lock_fd = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # another session still uses the chroot
            return
        try:
            # Several rounds: mounts may be stacked (an interrupted session mounted, then
            # another one mounted again on top), and `umount` removes the top one only.
            for _ in range(8):
                mounts = _mounts_under(self.root)
                if not mounts:
                    break
                for m in mounts:
                    _umount(m)
        finally:
            os.close(fd)


@dataclass
class PodmanEnv:
    """One podman (host or chroot) with its own configs and store under ``dir``."""

    generation: str
    dir: Path  # host path of this env's private directory
    chroot: Path | None  # None for the host's podman
    als_mount: Path | None
    version_tuple: tuple[int, int, int] = (0, 0, 0)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return ".".join(map(str, self.version_tuple))

    @property
    def protocol(self) -> str:
        return protocol_for(self.version_tuple)

    @property
    def graphroot(self) -> Path:
        return self.dir / "root"

    @property
    def runroot(self) -> Path:
        return self.dir / "run"

    @property
    def auth_file(self) -> Path:
        return self.dir / "auth.json"

    def podman_path(self, host_path: Path | str) -> str:
        """The path podman sees for a host path (must lie inside the chroot for "other")."""
        p = Path(host_path)
        if self.chroot is None:
            return str(p)
        try:
            rel = p.resolve().relative_to(self.chroot.resolve())
        except ValueError:
            raise ValueError(
                f"{p} is outside the chroot {self.chroot}: podman there cannot see it "
                "(use podman_env.workdir('other'))"
            ) from None
        return "/" + str(rel)

    def host_path(self, podman_path: Path | str) -> Path:
        """The host path of a path as podman sees it (inverse of :meth:`podman_path`)."""
        p = Path(podman_path)
        if self.chroot is None:
            return p
        return self.chroot / p.relative_to("/")

    def command(self, *args: str) -> list[str]:
        base = ["podman"] if self.chroot is None else ["chroot", str(self.chroot), "podman"]
        return [*base, *args]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT_S,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS`` with this env's configs; stdout/stderr are captured as text.

        With ``check`` a non-zero exit raises AssertionError holding the command and stderr,
        so a failing test shows podman's own message.
        """
        cmd = self.command(*args)
        proc = subprocess.run(
            cmd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}"
            )
        return proc

    def write_configs(self, registries: Sequence[str], auth_helper: str | None) -> None:
        pp = self.podman_path
        for d in (self.graphroot, self.runroot, self.dir / "libpod-tmp"):
            d.mkdir(parents=True, exist_ok=True)
        (self.dir / "containers.conf").write_text(
            CONTAINERS_CONF.format(tmp_dir=pp(self.dir / "libpod-tmp"))
        )
        storage = [
            "[storage]",
            'driver = "overlay"',
            f"graphroot = {_toml_str(pp(self.graphroot))}",
            f"runroot = {_toml_str(pp(self.runroot))}",
            "",
            "[storage.options]",
        ]
        if self.als_mount is not None:
            storage.append(f"additionallayerstores = {_toml_list([pp(self.als_mount) + ':ref'])}")
        (self.dir / "storage.conf").write_text("\n".join(storage) + "\n")
        reg = ["unqualified-search-registries = []"]
        if auth_helper is not None:
            reg.append(f"additional-layer-store-auth-helper = {_toml_str(auth_helper)}")
        # A location without a port also covers host:PORT (c/image matches the prefix up
        # to a ':' or '/'), so the loopback registry on any free port is insecure.
        for loc in dict.fromkeys(["127.0.0.1", "localhost", *registries]):
            reg += ["", "[[registry]]", f"location = {_toml_str(loc)}", "insecure = true"]
        (self.dir / "registries.conf").write_text("\n".join(reg) + "\n")
        # podman refuses a REGISTRY_AUTH_FILE that does not exist.
        if not self.auth_file.exists():
            self.auth_file.write_text('{"auths": {}}\n')
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": pp(self.dir),
            "TMPDIR": pp(self.dir / "libpod-tmp"),
            "CONTAINERS_CONF": pp(self.dir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": pp(self.dir / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": pp(self.dir / "registries.conf"),
            "REGISTRY_AUTH_FILE": pp(self.auth_file),
            # podman 5 warns on every command on this cgroups-v1 machine.
            "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
        }

    def teardown(self) -> None:
        """Remove everything this env made, never touching the ALS mount itself."""
        if self.env:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run("system", "reset", "--force", check=False, timeout=120)
        # Container and layer mounts podman left behind (spec.md §1.12: "umount
        # <root>/overlay before deleting"), and only those: an ALS mount may live in a
        # sibling directory and belongs to its own fixture.
        for sub in (self.graphroot, self.runroot, self.dir / "libpod-tmp"):
            for m in _mounts_under(sub):
                _umount(m)
        if not _mounts_under(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)


class PodmanFactory:
    """What the ``podman_env`` fixture yields: call it to get a :class:`PodmanEnv`."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._envs: list[PodmanEnv] = []
        self._workdirs: list[Path] = []

    def _other_root(self) -> Path:
        reason = other_root_unavailable()
        if reason is not None:
            pytest.skip(reason)
        root: Path = self._request.getfixturevalue("other_podman_root")
        return root

    def workdir(self, generation: str = "host") -> Path:
        """A fresh empty directory that podman of ``generation`` can see."""
        # Short paths on purpose, not pytest's tmp_path: with a runroot ~70 characters
        # long, podman 4.3.1 waits 20 s for every container to exit ("Exceeded conmon
        # timeout"), because the attach socket path under it exceeds what a unix socket
        # address holds.
        if generation == "host":
            d = Path(tempfile.mkdtemp(prefix="alsd-test-", dir="/tmp"))
        elif generation == "other":
            base = self._other_root() / "tmp"
            d = Path(tempfile.mkdtemp(prefix="alsd-test-", dir=base))
        else:
            raise ValueError(f"generation must be 'host' or 'other', not {generation!r}")
        self._workdirs.append(d)
        return d

    def __call__(
        self,
        generation: str = "host",
        als_mount: Path | None = None,
        *,
        registries: Sequence[str] = (),
        auth_helper: str | None = None,
    ) -> PodmanEnv:
        d = self.workdir(generation)
        chroot = None if generation == "host" else self._other_root()
        penv = PodmanEnv(generation=generation, dir=d, chroot=chroot, als_mount=als_mount)
        self._envs.append(penv)
        if als_mount is not None:
            penv.podman_path(als_mount)  # fails early if the chroot cannot see it
        penv.write_configs(registries, auth_helper)
        out = penv.run("--version").stdout
        penv.version_tuple = parse_version(out)
        return penv

    def close(self) -> None:
        for penv in reversed(self._envs):
            penv.teardown()
        for d in reversed(self._workdirs):
            # Delete only what holds no mount any more (an ALS fixture unmounts its own).
            if d.exists() and not _mounts_under(d):
                shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def other_podman_root() -> Iterator[Path]:
    reason = other_root_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = OtherRoot(Path(os.environ[OTHER_ROOT_ENV]))
    root.acquire()
    try:
        yield root.root
    finally:
        root.release()


@pytest.fixture
def podman_env(request: pytest.FixtureRequest) -> Iterator[PodmanFactory]:
    factory = PodmanFactory(request)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(params=GENERATIONS)
def podman_generation(request: pytest.FixtureRequest) -> str:
    generation: str = request.param
    if generation == "other":
        reason = other_root_unavailable()
        if reason is not None:
            pytest.skip(reason)
    return generation
