"""A fault-injecting HTTP proxy placed in front of the real test registry. TEST-ONLY.

It forwards every request to an upstream (the real ``docker-registry``) and, when a rule
matches, misbehaves instead: an HTTP status (500, 429 + Retry-After), a connection reset
in the middle of the body, a truncated body, a stall past the client's timeout, a
redirect to another host, a 400 for multi-range requests, a 200 that ignores Range, or
a corrupted body. It records every request (method, path, headers) for assertions.

It exists because these faults cannot be produced with the real registry alone; the
registry's own answers are passed through unchanged otherwise.

Besides rules for the next N matching requests, :meth:`FaultProxy.random_faults` faults a
seeded random fraction of the matching requests with a kind drawn from a list: ``reset``,
``truncate``, ``stall`` (no bytes for ``stall_s`` seconds mid-body, then the rest),
``503`` and ``trickle`` (the body at ``trickle_bps`` bytes/s). :attr:`FaultProxy.injected`
counts what was injected, by kind. Requests can be selected by User-Agent too, so that one
client's traffic (alsd's) is faulted and another's (podman's) is not.

Use (in an async test)::

    async with FaultProxy(registry.url) as proxy:      # listens on 127.0.0.1:<free port>
        proxy.fail(r"/blobs/", status=500, times=2)
        ... point the client at proxy.address ...

Concurrency: runs in the test's event loop; rules are consumed in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

_HOP_BY_HOP = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
    }
)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    rule: str | None  # the fault applied, if any
    status: int | None = None  # the status answered (None until answered)


@dataclass
class _Rule:
    kind: str
    path_re: re.Pattern[str]
    method: str | None
    times: int | None  # None: forever
    args: dict[str, Any] = field(default_factory=dict)

    def matches(self, request: web.Request) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and request.method != self.method:
            return False
        agent = self.args.get("user_agent")
        if agent is not None and agent not in request.headers.get("User-Agent", ""):
            return False
        if self.kind in ("reject_multirange",) and "," not in request.headers.get("Range", ""):
            return False
        return bool(self.path_re.search(request.path_qs))


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        inject_headers: dict[str, str] | None = None,
    ) -> None:
        """``inject_headers`` are added to forwarded requests (e.g. the upstream's Basic
        auth, so that a redirect target can serve without the client's credentials, as a
        pre-signed storage URL would)."""
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = 0
        self.inject_headers = inject_headers or {}
        self.requests: list[Recorded] = []
        self.injected: Counter[str] = Counter()
        self._rules: list[_Rule] = []
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> FaultProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def close(self) -> None:
        self._closing.set()  # releases stalled handlers
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # ------------------------------------------------------------ rules

    def _add(
        self, kind: str, path: str, times: int | None, method: str | None, **args: Any
    ) -> None:
        self._rules.append(_Rule(kind, re.compile(path), method, times, args))

    def fail(
        self,
        path: str,
        *,
        status: int,
        times: int | None = 1,
        method: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer ``status`` (with ``headers``) instead of forwarding."""
        self._add("status", path, times, method, status=status, headers=headers or {})

    def reset_body(self, path: str, *, times: int | None = 1, method: str | None = "GET") -> None:
        """Send the headers and half the body, then reset the TCP connection."""
        self._add("reset", path, times, method)

    def truncate_body(
        self, path: str, *, times: int | None = 1, method: str | None = "GET"
    ) -> None:
        """Announce the full Content-Length, send half the body, close cleanly."""
        self._add("truncate", path, times, method)

    def stall(
        self,
        path: str,
        *,
        times: int | None = 1,
        method: str | None = "GET",
        seconds: float | None = None,
    ) -> None:
        """Send the headers and half the body, then send nothing until the proxy closes
        (or, with ``seconds``, for that long, and then the rest of the body)."""
        self._add("stall", path, times, method, stall_s=seconds)

    def trickle(
        self,
        path: str,
        *,
        times: int | None = 1,
        method: str | None = "GET",
        bytes_per_s: int = 64 << 10,
    ) -> None:
        """Send the body at ``bytes_per_s``."""
        self._add("trickle", path, times, method, bps=bytes_per_s)

    def random_faults(
        self,
        fraction: float,
        kinds: Sequence[str] = ("reset", "truncate", "stall", "503", "trickle"),
        *,
        seed: int = 0,
        path: str = r"/blobs/",
        method: str | None = "GET",
        user_agent: str | None = None,
        stall_s: float = 4.0,
        trickle_bps: int = 64 << 10,
    ) -> None:
        """Fault ``fraction`` of the matching requests (those to ``path``, with
        ``user_agent`` in their User-Agent if given), each with a kind drawn from
        ``kinds``; the draws come from ``random.Random(seed)``, in arrival order."""
        unknown = set(kinds) - {"reset", "truncate", "stall", "503", "trickle"}
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self._add(
            "random", path, None, method, fraction=fraction, kinds=tuple(kinds),
            rng=random.Random(seed), user_agent=user_agent, stall_s=stall_s, bps=trickle_bps,
        )  # fmt: skip

    def redirect(self, path: str, to: str, *, times: int | None = None) -> None:
        """Answer 307 with Location = ``to`` + the request's path and query."""
        self._add("redirect", path, times, None, to=to.rstrip("/"))

    def reject_multirange(self, *, times: int | None = None) -> None:
        """400 for any request whose Range header names more than one range (as GCS does)."""
        self._add("reject_multirange", r".", times, None)

    def ignore_range(self, path: str, *, times: int | None = None) -> None:
        """Forward without the Range header: the registry answers 200 with the whole blob."""
        self._add("ignore_range", path, times, None)

    def corrupt_body(self, path: str, *, times: int | None = 1, method: str | None = "GET") -> None:
        """Flip one byte of the body."""
        self._add("corrupt", path, times, method)

    def requests_to(self, path: str) -> list[Recorded]:
        rx = re.compile(path)
        return [r for r in self.requests if rx.search(r.path)]

    # ------------------------------------------------------------ handling

    def _take_rule(self, request: web.Request) -> _Rule | None:
        for rule in self._rules:
            if rule.matches(request):
                if rule.times is not None:
                    rule.times -= 1
                if rule.kind == "random":
                    rng: random.Random = rule.args["rng"]
                    if rng.random() >= rule.args["fraction"]:
                        return None
                    kind = rng.choice(rule.args["kinds"])
                    if kind == "503":
                        return _Rule(
                            "status", rule.path_re, None, None, {"status": 503, "headers": {}}
                        )
                    return _Rule(kind, rule.path_re, None, None, dict(rule.args))
                return rule
        return None

    async def _forward(
        self, request: web.Request, drop: frozenset[str] = frozenset()
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        # A multidict: clients repeat headers (podman sends one Accept per media type).
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() not in drop
        )
        headers.update(self.inject_headers)
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            data = await up.read()
            out: dict[str, str] = {}
            for k, v in up.headers.items():
                # A HEAD answer keeps the upstream's Content-Length: it is the blob's size.
                keep = request.method == "HEAD" and k.lower() == "content-length"
                if k.lower() not in _HOP_BY_HOP or keep:
                    # WWW-Authenticate may repeat; joining keeps it parsable (RFC 9110 §5.3).
                    out[k] = f"{out[k]}, {v}" if k in out else v
            return up.status, out, data

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rule = self._take_rule(request)
        rec = Recorded(
            request.method, request.path_qs, dict(request.headers), rule.kind if rule else None
        )
        self.requests.append(rec)
        if rule is not None:
            self.injected[rule.kind] += 1
        resp = await self._answer(request, rule)
        rec.status = resp.status
        return resp

    async def _answer(self, request: web.Request, rule: _Rule | None) -> web.StreamResponse:
        if rule is None:
            return await self._send(request, *await self._forward(request))
        handlers: dict[str, Callable[[web.Request, _Rule], Awaitable[web.StreamResponse]]] = {
            "status": self._status,
            "reset": self._partial,
            "truncate": self._partial,
            "stall": self._partial,
            "trickle": self._trickle,
            "redirect": self._redirect,
            "reject_multirange": self._reject,
            "ignore_range": self._ignore_range,
            "corrupt": self._corrupt,
        }
        return await handlers[rule.kind](request, rule)

    async def _send(
        self, request: web.Request, status: int, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        resp = web.Response(status=status, headers=headers, body=body)
        return resp

    async def _status(self, request: web.Request, rule: _Rule) -> web.StreamResponse:
        return web.Response(
            status=rule.args["status"],
            headers=rule.args["headers"],
            text='{"errors":[{"code":"INJECTED","message":"fault proxy"}]}',
            content_type="application/json",
        )

    async def _redirect(self, request: web.Request, rule: _Rule) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": rule.args["to"] + request.path_qs})

    async def _reject(self, request: web.Request, rule: _Rule) -> web.StreamResponse:
        return web.Response(status=400, text="multiple ranges not supported")

    async def _ignore_range(self, request: web.Request, rule: _Rule) -> web.StreamResponse:
        status, headers, body = await self._forward(request, drop=frozenset({"range"}))
        return await self._send(request, status, headers, body)

    async def _corrupt(self, request: web.Request, rule: _Rule) -> web.StreamResponse:
        status, headers, body = await self._forward(request)
        if body:
            body = bytes([body[0] ^ 0x01]) + body[1:]
        return await self._send(request, status, headers, body)

    async def _partial(self, request: web.Request, rule: _Rule) -> web.StreamResponse:
        status, headers, body = await self._forward(request)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        half = max(1, len(body) // 2)
        await resp.write(body[:half])
        if rule.kind == "stall":
            stall_s = rule.args.get("stall_s")
            if stall_s is None:
                await self._closing.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), stall_s)
                with contextlib.suppress(ConnectionError):
                    await resp.write(body[half:])
                    await resp.write_eof()
        elif rule.kind == "reset":
            assert request.transport is not None
            request.transport.abort()
        else:  # truncate: end the connection cleanly, short of Content-Length
            assert request.transport is not None
            request.transport.close()
        return resp

    async def _trickle(self, request: web.Request, rule: _Rule) -> web.StreamResponse:
        status, headers, body = await self._forward(request)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        bps: int = rule.args["bps"]
        piece = max(1, bps // 10)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with contextlib.suppress(ConnectionError):
            for off in range(0, len(body), piece):
                await resp.write(body[off : off + piece])
                ahead = start + (off + piece) / bps - loop.time()
                if ahead > 0 and not self._closing.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), ahead)
            await resp.write_eof()
        return resp
