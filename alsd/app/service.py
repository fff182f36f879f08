"""Service glue: logging as journald reads it, and systemd's readiness protocol.

Synchronous; sd_notify never fails (a missing or broken NOTIFY_SOCKET is logged).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from typing import Any

log = logging.getLogger("alsd")


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
