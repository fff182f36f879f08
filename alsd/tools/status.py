"""``alsd status`` and ``alsd auth-helper``: the clients of the daemon's control socket.

``alsd status`` prints the status as text for an admin, per image and layer (alsd(8)
explains every line; ``--json`` for the raw document, whose keys are only added to);
``alsd auth-helper`` (and its argument-less twin ``alsd-auth-helper``) forwards stdin to
``POST /credentials``. The server side is :mod:`alsd.app.control`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from alsd.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError
from alsd.tools.text import duration, human_bytes

_TIMEOUT_S = 10.0  # of one request to the control socket


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    from alsd import config

    return config.load(args.config).control.socket


async def _request(
    path: str, method: str, url: str, body: bytes | None = None
) -> tuple[int, bytes]:
    import aiohttp

    conn = aiohttp.UnixConnector(path=path)
    timeout = aiohttp.ClientTimeout(total=_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(connector=conn, timeout=timeout) as session,
        session.request(method, f"http://alsd{url}", data=body) as resp,
    ):
        return resp.status, await resp.read()


# The engine's prefetch states, in an admin's words (alsd(8), PRIORITISED).
_PRIORITISED = {
    "pending": "waiting",
    "running": "fetching",
    "done": "fetched",
    "disabled": "off",  # [prefetch] landmark = false
    "no landmark": "none in image",  # not an optimised image: it marks no files
    "disabled by landmark": "none in image",  # optimised, marked "nothing to prefetch"
    "cancelled": "stopped",  # the layer was dropped from memory first
}


def _local(layer: Mapping[str, Any], bar: bool) -> str:
    total, local = layer.get("content_bytes"), layer.get("local_bytes")
    if not isinstance(total, int) or not isinstance(local, int):
        return "-"
    share = 1.0 if total == 0 else local / total
    pct = f"{math.floor(share * 100):3d}%"  # 100% only when all of it is local
    text = f"{pct} of {human_bytes(total)}"
    if bar:
        width = 20
        filled = math.floor(share * width)
        text = f"[{'#' * filled}{'-' * (width - filled)}] {text}"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


def _times(n: Any) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times") if isinstance(n, int) else "-"


def format_status(doc: Mapping[str, Any], *, bar: bool = False) -> str:
    """The status document as text for a person (alsd(8) explains every line); ``bar``
    draws how much of each layer is local as a bar too (for a terminal)."""
    layers = [la for la in doc.get("layers") or [] if isinstance(la, Mapping)]
    lines = [
        f"alsd        pid {doc.get('pid', '-')}, up {duration(doc.get('uptime_s'))}, serving "
        f"{doc.get('mountpoint', '-')}"
    ]
    store = doc.get("chunk_store") or {}
    if isinstance(store, Mapping) and "bytes" in store:
        used, limit = human_bytes(store.get("bytes")), human_bytes(store.get("max_bytes"))
        lines.append(f"cache       {used} of {limit} used, in {store.get('count', 0)} chunks")
    engine = doc.get("engine") or {}
    if isinstance(engine, Mapping) and "reads" in engine:
        reads, fetched = engine.get("reads", 0), engine.get("reads_fetched", 0)
        lines.append(
            f"reads       {reads} file reads answered: {reads - fetched} from the local cache, "
            f"{fetched} had to fetch from the registry first"
        )
    registry = doc.get("registry") or {}
    if isinstance(registry, Mapping) and "bytes" in registry:
        lines.append(
            f"fetched     {human_bytes(registry.get('bytes'))} from registries in "
            f"{registry.get('requests', 0)} requests (on-demand reads and their read-ahead, "
            "prioritised files, background fetch, manifests and TOCs)"
        )
    fuse = doc.get("fuse") or {}
    if isinstance(fuse, Mapping) and fuse:
        in_use = sum(1 for la in layers if (la.get("use_count") or 0) > 0)
        lines.append(
            f"podman      took layers into use {_times(fuse.get('uses', 0))} and released them "
            f"{_times(fuse.get('releases', 0))}; {in_use} of {len(layers)} layers in use now"
        )
    if not layers:
        lines.append("layers      none yet (podman has looked up no lazily pullable layer)")
        return "\n".join(lines)
    by_image: dict[str, list[Mapping[str, Any]]] = {}
    for la in layers:
        by_image.setdefault(str(la.get("ref", "-")), []).append(la)
    header = ("LAYER", "FORMAT", "USERS", "LOCAL", "FETCHED", "READ", "PRIORITISED",
              "MATERIALIZED")  # fmt: skip
    for ref in sorted(by_image):
        rows = [
            (
                str(la.get("digest", ""))[:19],
                str(la.get("format", "")),
                str(la.get("use_count", "")),
                _local(la, bar),
                human_bytes(la.get("bytes_fetched")),
                human_bytes(la.get("bytes_served")),
                _PRIORITISED.get(str(la.get("prefetch")), str(la.get("prefetch", "-"))),
                str(la.get("materialized", "-")),
            )
            for la in sorted(by_image[ref], key=lambda la: la.get("layer_no") or 0)
        ]
        lines += ["", f"IMAGE {ref}", *_table(header, rows, "  ")]
    lines += [
        "",
        "LOCAL: share of the layer's file content on this machine; USERS: podman's "
        "containers and pulls using it; READ: bytes given to readers; MATERIALIZED: yes "
        "once new containers get the layer as a plain directory (man alsd)",
    ]
    return "\n".join(lines)


def _connect_error(cmd: str, path: str, exc: BaseException) -> str:
    """Why the control socket did not answer, and what to do about it."""
    os_error = getattr(exc, "os_error", exc)  # aiohttp wraps the OSError
    hint = "start it with `systemctl start alsd`, or pass --config/--socket"
    if isinstance(os_error, FileNotFoundError):
        return f"alsd is not running (no socket at {path}); {hint}"
    if isinstance(os_error, ConnectionRefusedError):
        return f"alsd is not running (nothing listens on the socket {path}); {hint}"
    if isinstance(os_error, PermissionError):
        return (
            f"not allowed to connect to {path}: the control socket is root's only (mode "
            f"0600); run alsd {cmd} as root"
        )
    if isinstance(exc, TimeoutError):
        return f"alsd did not answer on {path} within {_TIMEOUT_S:g} s"
    reason = getattr(os_error, "strerror", None) or str(exc)
    return f"cannot reach alsd at {path}: {reason}"


def _parser(cmd: str) -> argparse.ArgumentParser:
    if cmd == "status":
        desc = (
            "Show what the running daemon serves: per image its layers, how much of each is "
            "local, what was fetched and read; cache use and uptime (alsd(8) explains each "
            "line). Exit status 1 if the daemon is not running."
        )
    else:
        desc = (
            "Hand podman's registry credentials to the running daemon: reads the JSON that "
            "containers/image writes to an additional-layer-store-auth-helper on stdin and "
            "posts it to the control socket. Exit status 1 if the daemon cannot be reached "
            "(podman only logs it)."
        )
    p = argparse.ArgumentParser(prog=f"alsd {cmd}", description=desc)
    p.add_argument("--config", metavar="FILE", help="read the socket path from this alsd.toml")
    p.add_argument("--socket", metavar="PATH", help="control socket (overrides the config)")
    if cmd == "status":
        p.add_argument("--json", action="store_true", help="print the raw JSON document")
    return p


def main(cmd: str, argv: Sequence[str]) -> int:
    import asyncio

    args = _parser(cmd).parse_args(list(argv))
    try:
        path = _socket_path(args)
    except ConfigError as exc:
        print(f"alsd {cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if cmd == "status":
        method, url, body = "GET", "/status", None
    else:
        method, url, body = "POST", "/credentials", sys.stdin.buffer.read()
    try:
        status, data = asyncio.run(_request(path, method, url, body))
    except (TimeoutError, OSError) as exc:  # aiohttp's connection errors are OSErrors
        print(f"alsd {cmd}: {_connect_error(cmd, path, exc)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # other aiohttp client errors
        print(f"alsd {cmd}: request to {path} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if status != 200:
        print(
            f"alsd {cmd}: alsd answered {status}: {data.decode(errors='replace')}", file=sys.stderr
        )
        return EXIT_FAILED
    if cmd == "status":
        doc = json.loads(data)
        if args.json:
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print(format_status(doc, bar=sys.stdout.isatty()))
    return EXIT_OK


def auth_helper_main() -> int:
    """``alsd-auth-helper``: the executable named in registries.conf.

    containers/image runs ``additional-layer-store-auth-helper`` as one program with no
    arguments (spec.md §1.10), so ``alsd auth-helper`` needs this argument-less twin.
    """
    return main("auth-helper", sys.argv[1:])
