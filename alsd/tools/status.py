"""``alsd status`` and ``alsd auth-helper``: the clients of the daemon's control socket.

``alsd status`` prints the status as a table (``--json`` for the raw document);
``alsd auth-helper`` (and its argument-less twin ``alsd-auth-helper``) forwards stdin to
``POST /credentials``. The server side is :mod:`alsd.app.control`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from alsd.errors import ConfigError


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
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(connector=conn, timeout=timeout) as session,
        session.request(method, f"http://alsd{url}", data=body) as resp,
    ):
        return resp.status, await resp.read()


def _human(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def format_status(doc: Mapping[str, Any]) -> str:
    """The status document as text for a person."""
    lines = [
        f"mountpoint  {doc.get('mountpoint', '-')}",
        f"uptime      {doc.get('uptime_s', 0):.0f}s   pid {doc.get('pid', '-')}",
    ]
    store = doc.get("chunk_store") or {}
    if isinstance(store, Mapping) and "bytes" in store:
        lines.append(
            f"cache       {_human(store.get('bytes'))} of {_human(store.get('max_bytes'))} "
            f"in {store.get('count', 0)} chunks; hits {store.get('hits', 0)}, "
            f"misses {store.get('misses', 0)}"
        )
    fuse = doc.get("fuse") or {}
    if fuse:
        lines.append(f"use/release {fuse.get('uses', 0)}/{fuse.get('releases', 0)}")
    layers = doc.get("layers") or []
    lines.append(f"layers      {len(layers)}")
    if layers:
        header = ("REFERENCE", "DIGEST", "FORMAT", "USES", "FETCHED", "SERVED", "PREFETCH",
                  "LOCAL", "MATERIALIZED")  # fmt: skip
        rows = [
            (
                str(la.get("ref", "")),
                str(la.get("digest", ""))[:19],
                str(la.get("format", "")),
                str(la.get("use_count", "")),
                _human(la.get("bytes_fetched")),
                _human(la.get("bytes_served")),
                str(la.get("prefetch", "")),
                _human(la.get("local_bytes")),
                str(la.get("materialized", "-")),
            )
            for la in layers
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("")
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _parser(cmd: str) -> argparse.ArgumentParser:
    if cmd == "status":
        desc = "Show the running daemon's layers, use counts, cache use and uptime."
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
        return 2
    if cmd == "status":
        method, url, body = "GET", "/status", None
    else:
        method, url, body = "POST", "/credentials", sys.stdin.buffer.read()
    try:
        status, data = asyncio.run(_request(path, method, url, body))
    except (TimeoutError, OSError) as exc:
        print(f"alsd {cmd}: cannot reach alsd at {path}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # aiohttp client errors
        print(f"alsd {cmd}: request to {path} failed: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(
            f"alsd {cmd}: alsd answered {status}: {data.decode(errors='replace')}", file=sys.stderr
        )
        return 1
    if cmd == "status":
        doc = json.loads(data)
        print(json.dumps(doc, indent=2, sort_keys=True) if args.json else format_status(doc))
    return 0


def auth_helper_main() -> int:
    """``alsd-auth-helper``: the executable named in registries.conf.

    containers/image runs ``additional-layer-store-auth-helper`` as one program with no
    arguments (spec.md §1.10), so ``alsd auth-helper`` needs this argument-less twin.
    """
    return main("auth-helper", sys.argv[1:])
