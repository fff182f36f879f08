"""``alsd [--config FILE] [flags]``: run the layer store (wiring and lifecycle only).

Start-up: read the configuration (a mistake is one message and exit status 2), build the
registry client, chunk store, metadata store and engine, prepare the mountpoint (create
it; lazily unmount a dead mount a killed instance left behind, since a mountpoint that
answers ENOTCONN breaks every podman command), mount with pyfuse3 in asyncio mode, start
the control socket, tell systemd READY=1.

Shut-down (SIGTERM/SIGINT): ``pyfuse3.terminate()`` stops taking FUSE requests; those
in flight get ``STOP_GRACE_S`` to finish, then answer EIO; an
AsyncExitStack then tears down in reverse order of construction: control socket,
unmount, engine (cancels fetches; metadata is saved as layers resolve), chunk store
(flushes and marks clean), registry sessions. Exit status 0.

Concurrency: everything runs on one event loop; pyfuse3 runs at most ``[fuse] max_tasks``
handlers at a time (each awaits inline in a worker task, so this bounds in-flight kernel
requests and, through them, the registry fetches they trigger).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from alsd import config
from alsd.config import Config
from alsd.errors import AlsdError, ConfigError

log = logging.getLogger("alsd")

EXIT_CONFIG = 2
EXIT_FAILURE = 1
# After SIGTERM/SIGINT, requests still in flight (a read or lookup waiting on a slow or
# silent registry) get this long before they are answered EIO; well below systemd's
# default TimeoutStopSec (90 s), past which a SIGKILL would leave a dead mount.
STOP_GRACE_S = 5.0


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    from alsd.cli import SUBCOMMANDS

    settings = "\n".join(
        f"  {key} (default {default!r}): {doc}" for key, default, doc in config.iter_settings()
    )
    subcommands = "\n".join(f"  alsd {name:12} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    p = argparse.ArgumentParser(
        prog="alsd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Additional Layer Store daemon: mounts a FUSE filesystem that podman / "
            "containers-storage uses as an additional layer store, serving eStargz and "
            "zstd:chunked layers lazily from their registry.\n\n"
            "storage.conf:  [storage.options]\n"
            '               additionallayerstores = ["<mountpoint>:ref"]\n\n'
            "alsd runs in the foreground (systemd Type=notify) and logs to stderr. "
            "SIGTERM or SIGINT unmount and exit 0. Exit status 2: the configuration is "
            "malformed."
        ),
        epilog=f"subcommands:\n{subcommands}\n\nsettings of the config file:\n{settings}",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default {config.DEFAULT_CONFIG_PATH}; a missing default "
        "file means all defaults, a missing named file is an error)",
    )
    p.add_argument("--mountpoint", metavar="DIR", help="overrides 'mountpoint' of the file")
    p.add_argument("--state-dir", metavar="DIR", help="overrides 'state_dir' of the file")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides 'log_level' of the file",
    )
    return p


def load_config(argv: Sequence[str]) -> Config:
    """Parse ``argv`` and the configuration file (argparse exits 2 on bad flags)."""
    args = build_parser().parse_args(list(argv))
    cfg = config.load(args.config)
    return config.with_overrides(
        cfg, mountpoint=args.mountpoint, state_dir=args.state_dir, log_level=args.log_level
    )


def main(argv: Sequence[str]) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        print(f"alsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log_level)
    try:
        return asyncio.run(run(cfg))
    except ConfigError as exc:  # registries.conf or an auth file, read at start-up
        log.error("%s", exc)
        return EXIT_CONFIG
    except (AlsdError, OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE


# ------------------------------------------------------------------ logging


class _OneLineFormatter(logging.Formatter):
    """One line per record, tracebacks included (journald and grep see whole records).

    Under systemd (JOURNAL_STREAM set) the line starts with the syslog priority ``<N>``,
    which journald turns into the record's priority, and carries no timestamp of its own.
    """

    _PRIO = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, journald: bool) -> None:
        fmt = "%(name)s %(levelname)s %(message)s"
        super().__init__(fmt if journald else "%(asctime)s " + fmt)
        self._journald = journald

    def formatException(self, ei: Any) -> str:
        return " | ".join(
            line.rstrip() for line in "".join(traceback.format_exception(*ei)).splitlines()
        )

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\n", " | ")
        if self._journald:
            return f"<{self._PRIO.get(record.levelname, 6)}>{line}"
        return line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level != "debug":
        # aiohttp's access log and pyfuse3's per-request debug lines are noise at info.
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


# ------------------------------------------------------------------ systemd


def sd_notify(state: str) -> None:
    """Tell systemd ``state`` (READY=1, STOPPING=1) if it is listening; never fails."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state, exc)


# ------------------------------------------------------------------ mountpoint


def prepare_mountpoint(path: str) -> None:
    """Make ``path`` an empty directory we can mount on; clear a dead mount left by a crash.

    A FUSE mount whose daemon died answers ENOTCONN, but ``stat`` of its root may still
    succeed from the kernel's attribute cache, so a FUSE mount found here is probed with
    ``statfs``, which always reaches the (dead or alive) daemon.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        dead = True
    else:
        dead = False
        if _is_fuse_mount(path):
            try:
                os.statvfs(path)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise
                dead = True
            else:
                raise RuntimeError(f"{path}: a live FUSE filesystem is mounted here")
    if dead:
        log.warning("%s: a previous alsd left a dead mount; unmounting it lazily", path)
        _lazy_unmount(path)
        os.stat(path)  # still broken: let the OSError say so
    if not os.path.isdir(path):
        raise RuntimeError(f"{path}: not a directory")
    if os.listdir(path):
        # Mounting would hide what is there (a mistyped path such as podman's own
        # storage or alsd's state dir) and everything written there afterwards.
        raise RuntimeError(f"{path}: not empty; refusing to mount over its files")


def _lazy_unmount(path: str) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    commands = ([[tool, "-u", "-z", path]] if tool else []) + [["umount", "-l", path]]
    for cmd in commands:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode == 0:
            return
        log.warning("%s failed: %s", " ".join(cmd), r.stderr.strip())
    raise RuntimeError(f"{path}: cannot unmount the dead mount")


def set_read_ahead(mountpoint: str, kib: int) -> bool:
    """Set the read-ahead of the FUSE mount at ``mountpoint`` (its bdi's read_ahead_kb).

    The kernel's default, 128 KiB, makes a sequential read of a big file cost one FUSE
    request per 128 KiB, and each request is a round trip through this daemon; with more
    read-ahead the kernel asks for up to 1 MiB at a time (its max_pages). Must run after
    FUSE INIT, which lowers the bdi's read-ahead to what the daemon negotiated. Only root
    may write the setting: anyone else keeps the default (one info line).
    """
    dev = _mount_device(mountpoint)
    if dev is None:
        log.info("%s: mount not found in mountinfo; read-ahead left as it is", mountpoint)
        return False
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        log.info("cannot set read-ahead of %s (%s): %s", mountpoint, path, exc)
        return False
    log.debug("%s: read-ahead %d KiB (%s)", mountpoint, kib, path)
    return True


def _mount_device(path: str) -> str | None:
    """``major:minor`` of the (last) mount at ``path``, from /proc/self/mountinfo. A stat of
    our own mountpoint from the event loop would wait for ourselves, so only its parent
    is resolved (realpath of the mountpoint itself would stat it)."""
    absolute = os.path.abspath(path)
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == real:
                    found = fields[2]
    except OSError:
        return None
    return found


def _is_fuse_mount(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and _unescape(fields[1]) == real:
                    return fields[2].startswith("fuse")
    except OSError:
        pass
    return False


def _unescape(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as octal.
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")).replace(
        "\\134", "\\"
    )


def mount_options() -> set[str]:
    """FUSE mount options; why each one is there:

    - default_permissions: the kernel enforces modes and owners, so with the root-only top
      directory no other local user can read layers pulled with credentials;
    - allow_other (only when run as root): podman, overlayfs and containers run under
      other credentials than the daemon's;
    - suid: setuid programs in images must stay setuid (libfuse mounts nosuid otherwise);
    - no "ro": containers/storage creates ``use`` and removes layer directories on this
      mount, and the kernel would answer EROFS itself before asking us.
    """
    opts = set(_pyfuse3().default_options) | {"fsname=alsd", "subtype=alsd", "default_permissions"}
    if os.geteuid() == 0:
        opts |= {"allow_other", "suid"}
    return opts


def _pyfuse3() -> Any:
    import pyfuse3
    import pyfuse3.asyncio

    # Must happen before pyfuse3.init: switches pyfuse3 from trio to asyncio.
    pyfuse3.asyncio.enable()
    return pyfuse3


# ------------------------------------------------------------------ run


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The default handler, except for one harmless pyfuse3 race at shutdown.

    pyfuse3.asyncio waits for the FUSE fd with ``loop.add_reader(fd, future.set_result)``;
    ``terminate()`` fails that future, but when the fd was already readable in the same
    loop iteration the queued reader callback still runs and ``set_result`` raises
    InvalidStateError, which asyncio would log as an error with a traceback.
    """
    exc = context.get("exception")
    if isinstance(exc, asyncio.InvalidStateError) and "Future.set_result" in repr(
        context.get("handle")
    ):
        log.debug("ignored at shutdown: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


def _state_dir(path: str) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


async def run(cfg: Config) -> int:
    """Mount, serve until SIGTERM/SIGINT, unmount. Raises on start-up failure."""
    from alsd import control, registry_setup
    from alsd.chunkstore import ChunkStore
    from alsd.engine import Engine
    from alsd.fuse_ops import Operations
    from alsd.metadata import MetadataStore
    from alsd.tree import Tree

    pyfuse3 = _pyfuse3()
    started = time.time()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_exception_handler)
    state = _state_dir(cfg.state_dir)

    async with AsyncExitStack() as stack:
        credentials = registry_setup.credential_store(cfg)
        registry = registry_setup.registry_client(cfg, credentials=credentials)
        stack.push_async_callback(registry.close)

        store = ChunkStore(state / "chunks", cfg.cache.max_bytes)
        await store.open()
        stack.push_async_callback(store.close)
        metadata = MetadataStore(state / "metadata")
        await metadata.sweep_async()

        engine = Engine(registry, store, metadata, config.engine_settings(cfg))
        await engine.load_state()
        stack.push_async_callback(engine.close)

        tree = Tree(uid=os.geteuid(), gid=os.getegid(), mtime_ns=time.time_ns())
        # The engine bounds resolution itself; this is only the backstop that keeps a
        # podman lookup from hanging if it does not.
        ops = Operations(tree, engine, resolve_timeout_s=cfg.fetch.resolve_timeout_s + 5.0)

        prepare_mountpoint(cfg.mountpoint)
        if cfg.fuse.read_ahead_kb:
            kib = cfg.fuse.read_ahead_kb

            def after_init() -> None:
                set_read_ahead(cfg.mountpoint, kib)

            ops.after_init = after_init
        pyfuse3.init(ops, cfg.mountpoint, mount_options())

        def close_fuse() -> None:
            # Unmount even after a failure: a dead mount breaks every podman command.
            log.info("unmounting %s", cfg.mountpoint)
            pyfuse3.close(unmount=True)

        stack.callback(close_fuse)

        await stack.enter_async_context(
            control.serve(
                cfg.control.socket,
                engine=engine,
                ops=ops,
                credentials=credentials.helper,
                started_at=started,
                mountpoint=cfg.mountpoint,
            )
        )

        def on_signal(signum: int) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            pyfuse3.terminate()
            loop.call_later(STOP_GRACE_S, interrupt_requests)

        def interrupt_requests() -> None:
            n = ops.cancel_inflight()
            if n:
                log.warning(
                    "%d request(s) still in flight %gs after the signal: EIO", n, STOP_GRACE_S
                )

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
            stack.callback(loop.remove_signal_handler, sig)

        log.info(
            "serving %s (state %s, control %s)",
            cfg.mountpoint,
            cfg.state_dir,
            cfg.control.socket,
        )
        sd_notify("READY=1")
        await pyfuse3.main(min_tasks=1, max_tasks=cfg.fuse.max_tasks)
    log.info("stopped")
    return 0
