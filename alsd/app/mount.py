"""The mountpoint: preparing it (clearing a dead mount), FUSE mount options, read-ahead.

A FUSE mount whose daemon died answers ENOTCONN and breaks every podman command, so a
dead mount left by a killed instance is unmounted lazily before mounting again.
Synchronous (runs before the mount, or from FUSE INIT for the read-ahead).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from typing import Any

log = logging.getLogger("alsd")


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
    opts = set(pyfuse3_module().default_options) | {
        "fsname=alsd",
        "subtype=alsd",
        "default_permissions",
    }
    if os.geteuid() == 0:
        opts |= {"allow_other", "suid"}
    return opts


def pyfuse3_module() -> Any:
    import pyfuse3
    import pyfuse3.asyncio

    # Must happen before pyfuse3.init: switches pyfuse3 from trio to asyncio.
    pyfuse3.asyncio.enable()
    return pyfuse3
