"""The reference Additional Layer Store, ``stargz-store`` (containerd/stargz-snapshotter), run
side by side with alsd on the same images and link (``bench/run --compare-stargz-store PATH``).

The benchmark takes the binary's path; nothing here ships or builds it. Versions up to
v0.12 speak only the blob-digest generation of the store protocol, which podman up to 5.0
uses, so the runner gives it only those podman generations.

Its configuration here: every registry host the benchmark uses is a plain-HTTP mirror of
itself (``[[resolver.host."H".mirrors]] host = "H", insecure = true``); everything else is
its default (prefetch of the landmark region, background fetch of the rest of each layer).
It stops cleanly (unmounting itself) only on SIGINT; after any other end its mountpoint is
lazily unmounted with ``fusermount3 -u -z``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class StargzStore:
    """One stargz-store process with its state under ``workdir`` (the runner's handle)."""

    def __init__(self, binary: Path, workdir: Path, hosts: list[str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.mountpoint = workdir / "mnt"
        self.root = workdir / "root"
        self.config = workdir / "config.toml"
        self.log_path = workdir / "stargz-store.log"
        self.hosts = hosts
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StargzStore:
        for d in (self.mountpoint, self.root):
            d.mkdir(parents=True, exist_ok=True)
        self.config.write_text("".join(
            f'[[resolver.host."{h}".mirrors]]\nhost = "{h}"\ninsecure = true\n\n'
            for h in self.hosts
        ))  # fmt: skip
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.binary), "--root", str(self.root), "--config", str(self.config),
                 str(self.mountpoint)],
                stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail(800)
                self.cleanup()
                raise RuntimeError(f"stargz-store did not mount: {tail}")
            time.sleep(0.02)
        return self

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.proc = None
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()
