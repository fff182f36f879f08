"""The control socket (HTTP over a unix socket, mode 0600): the daemon's side.

:func:`serve`, started by the daemon, answers:

- ``GET /status``: JSON: the engine's status (layers with reference, digest, format, use
  count, bytes fetched and served, prefetch state; chunk store use), the FUSE request
  counters, uptime and mountpoint;
- ``GET /metrics``: the same numbers in the Prometheus text format (also served alone over
  TCP by :func:`serve_metrics` when ``[control] metrics_address`` is set, for Prometheus);
- ``POST /credentials``: the JSON podman's ``additional-layer-store-auth-helper`` receives
  on stdin (``{"<image ref>": {"username", "password", "identityToken"}}``), kept in
  memory only.

The socket is root-only (mode 0600 before it listens) because it accepts credentials
and reveals which images are in use.

The client side (``alsd status``, ``alsd auth-helper``) is :mod:`alsd.tools.status`.

Concurrency: handlers run on the daemon's event loop and only read engine state or add
credentials, between awaits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web

from alsd.config import parse_host_port
from alsd.errors import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
MAX_CREDENTIALS_BYTES = 1 << 20


class StatusSource(Protocol):
    def status(self) -> dict[str, Any]: ...


class HostStatsSource(Protocol):
    def host_stats(self) -> Mapping[str, Mapping[str, Any]]: ...


class CredentialSink(Protocol):
    def add_json(self, data: bytes | str) -> int: ...


# ------------------------------------------------------------------ server


def status_document(
    engine: StatusSource,
    ops: Any,
    *,
    started_at: float,
    mountpoint: str,
    registry: HostStatsSource | None = None,
) -> dict[str, Any]:
    doc = dict(engine.status())
    if registry is not None:
        # Per registry host: retries, hedges, stalls, faults and the speed they derive from.
        doc["registry_hosts"] = {h: dict(v) for h, v in registry.host_stats().items()}
    doc["mountpoint"] = mountpoint
    doc["pid"] = os.getpid()
    doc["uptime_s"] = round(time.time() - started_at, 3)
    stats = getattr(ops, "stats", None)
    if stats is not None:
        doc["fuse"] = {
            "requests": dict(stats.requests),
            "errors": {f"{op}:{err}": n for (op, err), n in stats.errors.items()},
            "seconds": {op: round(s, 6) for op, s in stats.seconds.items()},
            "bytes_read": dict(stats.bytes_read),
            "uses": stats.uses,
            "releases": stats.releases,
            "negative_lookups": stats.negative_lookups,
            "invalidations": stats.invalidations,
        }
    return doc


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _fmt(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def metrics_text(doc: Mapping[str, Any]) -> str:
    """Prometheus text exposition of a status document."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, Any]]) -> None:
        lines = []
        for labels, value in samples:
            v = _number(value)
            if v is not None:
                lines.append(f"{name}{labels} {_fmt(v)}")
        if lines:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

    family(
        "alsd_uptime_seconds", "gauge", "Seconds since alsd started.", [("", doc.get("uptime_s"))]
    )
    fuse = doc.get("fuse") or {}
    family(
        "alsd_fuse_requests_total",
        "counter",
        "FUSE requests handled, by operation.",
        [(f'{{op="{_label(op)}"}}', n) for op, n in sorted(fuse.get("requests", {}).items())],
    )
    family(
        "alsd_fuse_request_seconds_total",
        "counter",
        "Time spent in FUSE handlers, by operation (divide by requests for latency).",
        [(f'{{op="{_label(op)}"}}', s) for op, s in sorted(fuse.get("seconds", {}).items())],
    )
    errors = []
    for key, n in sorted(fuse.get("errors", {}).items()):
        op, _, err = key.partition(":")
        errors.append((f'{{op="{_label(op)}",errno="{_label(err)}"}}', n))
    family("alsd_fuse_errors_total", "counter", "FUSE requests answered with an error.", errors)
    family(
        "alsd_fuse_read_bytes_total",
        "counter",
        "Bytes returned by FUSE reads, by file kind.",
        [(f'{{file="{_label(k)}"}}', n) for k, n in sorted(fuse.get("bytes_read", {}).items())],
    )
    family(
        "alsd_layer_uses_total",
        "counter",
        "use notifications counted (CREATE use).",
        [("", fuse.get("uses"))],
    )
    family(
        "alsd_layer_releases_total",
        "counter",
        "release notifications counted (RMDIR).",
        [("", fuse.get("releases"))],
    )
    family(
        "alsd_fuse_negative_lookups_total",
        "counter",
        "Lookups of names absent from a layer, answered as cacheable negative entries.",
        [("", fuse.get("negative_lookups"))],
    )
    hosts = doc.get("registry_hosts") or {}
    for key, help_ in (
        ("requests", "HTTP requests sent to the registry host (retries and hedges included)."),
        ("retries", "Requests sent again after a fault (reset, truncation, stall, 5xx, ...)."),
        ("hedges", "Second requests sent for a blob read that ran far beyond the usual time."),
        ("stalls", "Bodies broken off after sending no byte for the stall limit."),
        ("faults", "Failed attempts: resets, truncated or stalled bodies, timeouts, 5xx/429."),
    ):
        family(
            f"alsd_registry_{key}_total",
            "counter",
            help_,
            [(f'{{host="{_label(h)}"}}', v.get(key)) for h, v in sorted(hosts.items())],
        )
    layers = doc.get("layers") or []
    family("alsd_layers", "gauge", "Layers resolved and held in memory.", [("", len(layers))])
    for key, help_ in (
        ("use_count", "Current use count of the layer."),
        ("bytes_fetched", "Compressed bytes fetched from the registry for the layer."),
        ("bytes_served", "Bytes served from the layer."),
        ("compressed_size", "Size of the compressed layer blob."),
    ):
        family(
            f"alsd_layer_{key}",
            "gauge",
            help_,
            [
                (
                    f'{{ref="{_label(la.get("ref"))}",digest="{_label(la.get("digest"))}"}}',
                    la.get(key),
                )
                for la in layers
            ],
        )
    for section, help_ in (
        ("chunk_store", "Chunk store (local cache)"),
        ("fetch", "Registry fetches (hits/misses of the cache, integrity errors)"),
        ("engine", "Layer engine"),
    ):
        values = doc.get(section) or {}
        if not isinstance(values, Mapping):
            continue
        for key, value in sorted(values.items()):
            family(f"alsd_{section}_{key}", "untyped", f"{help_}: {key}.", [("", value)])
    return "\n".join(out) + "\n"


def _bind_private_socket(path: str) -> socket.socket:
    """A listening-ready unix socket at ``path`` with mode 0600 before anyone can connect."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path}: control socket path exists and is not a socket")
        os.unlink(path)  # left by a previous instance
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Nobody can connect before listen(), which aiohttp does after this chmod.
        os.chmod(path, 0o600)
    except OSError:
        sock.close()
        raise
    return sock


def _metrics_handler(
    engine: StatusSource,
    ops: Any,
    started_at: float,
    mountpoint: str,
    registry: HostStatsSource | None = None,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def get_metrics(request: web.Request) -> web.Response:
        doc = status_document(
            engine, ops, started_at=started_at, mountpoint=mountpoint, registry=registry
        )
        return web.Response(
            body=metrics_text(doc).encode(), headers={"Content-Type": CONTENT_TYPE_METRICS}
        )

    return get_metrics


@contextlib.asynccontextmanager
async def serve_metrics(
    address: str,
    *,
    engine: StatusSource,
    ops: Any,
    started_at: float,
    mountpoint: str,
    registry: HostStatsSource | None = None,
) -> AsyncIterator[None]:
    """Serve ``GET /metrics`` alone on TCP ``address`` ("HOST:PORT") until the context exits;
    every other path is 404 (the control API and credentials stay on the unix socket)."""
    host, port = parse_host_port(address)
    app = web.Application()
    app.router.add_get(
        "/metrics", _metrics_handler(engine, ops, started_at, mountpoint, registry)
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"control.metrics_address: cannot listen on {address}: {exc.strerror or exc}"
            ) from None
        log.info("serving /metrics on http://%s/metrics", address)
        yield
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve(
    path: str,
    *,
    engine: StatusSource,
    ops: Any,
    credentials: CredentialSink,
    started_at: float,
    mountpoint: str,
    registry: HostStatsSource | None = None,
) -> AsyncIterator[None]:
    """Serve the control API on ``path`` until the context exits."""

    def document() -> dict[str, Any]:
        return status_document(
            engine, ops, started_at=started_at, mountpoint=mountpoint, registry=registry
        )

    async def get_status(request: web.Request) -> web.Response:
        doc = document()
        return web.json_response(doc, dumps=lambda o: json.dumps(o, default=str))

    get_metrics = _metrics_handler(engine, ops, started_at, mountpoint, registry)

    async def post_credentials(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            n = credentials.add_json(body)
        except ConfigError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"added": n})

    app = web.Application(client_max_size=MAX_CREDENTIALS_BYTES)
    app.router.add_get("/status", get_status)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_post("/credentials", post_credentials)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = _bind_private_socket(path)
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        yield
    finally:
        await runner.cleanup()
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
