"""HTTP to registries: one request loop with authentication, redirects, retries, deadline.

:meth:`Transport.call` is the one place a request is sent. It

* asks the :class:`AuthSource` (the :class:`~alsd.registry.authorizer.Authorizer`) for
  the ``Authorization`` header of the endpoint and scope, and on a 401 lets it read the
  challenge, then retries once (a second 401 is Unauthorized);
* follows redirects by hand (at most ``_MAX_REDIRECTS``), never sending
  ``Authorization`` to another host; a blob's redirect target is cached per
  (host, repository, digest) and re-resolved once when it answers 403 (expired
  pre-signed URL);
* retries connection errors, timeouts, 429 and 5xx with exponential backoff and jitter
  (``Retry-After`` honoured), and a body that broke (reset, truncated, or stalled: no byte
  for :meth:`HostHealth.stall_after_s`) at once, all bounded by ``max_retries`` and by
  the deadline of the public call (:class:`Attempt`, shared by all its requests; every
  request's timeout is cut to what is left of it);
* :meth:`Transport.call_hedged` (blob reads) sends a second, identical request when the
  first runs far beyond what this host usually takes, within the same deadline; the
  first answer wins and the other is cancelled;
* keeps per host what it has been doing (:mod:`alsd.registry.health`): time to first
  byte, throughput, and the retries, hedges, stalls and faults, for /status and /metrics
  and a rate-limited info line each;
* bounds concurrent requests per host (a semaphore per host);
* goes through the HTTP(S) proxy the environment names for the URL
  (:mod:`alsd.registry.proxyenv`; CONNECT for https://, absolute-form for http://);
* hands the final response to the caller's ``handler``, which reads the body with
  :meth:`read_body` (bounded, counted) and maps a bad status with :meth:`raise_status`.

Token requests go through the same loop with ``auth=False, follow_redirects=False``.
Knows nothing of the distribution API beyond status codes and error bodies.

Concurrency: one event loop; state is mutated only between awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

import aiohttp
from yarl import URL

from alsd.config import RegistrySettings
from alsd.counters import ByteCounter
from alsd.errors import AlsdError, NotFound, RegistryError, Transient, Unauthorized
from alsd.oci.auth import repository_scope
from alsd.oci.reference import Reference
from alsd.registry.health import HostHealth
from alsd.registry.proxyenv import ProxyConfig
from alsd.registry.regconf import Endpoint

log = logging.getLogger("alsd.registry")

T = TypeVar("T")
Handler = Callable[[aiohttp.ClientResponse], Awaitable[T]]

_MAX_REDIRECTS = 5
# 501 Not Implemented will not get better by asking again (go-retryablehttp agrees).
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504, 505, 506, 507, 508, 509, 510, 511, 599})
# How much of an error answer is read for its message.
_ERROR_BODY_BYTES = 64 << 10


@dataclass
class Attempt:
    """The retry budget of one public call (all its requests share it)."""

    deadline: float  # loop time
    retries: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _HostState:
    sem: asyncio.Semaphore
    health: HostHealth
    single_range: bool = False  # answered 400 to a multi-range request once


class BodyBroke(Transient):
    """The answer's body broke off (reset, truncated, stalled): asked again at once."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class AuthSource(Protocol):
    """Authorization for requests to an endpoint (see alsd.registry.authorizer)."""

    async def header(
        self, ep: Endpoint, ref: Reference, scope: str, counter: ByteCounter | None, att: Attempt
    ) -> str | None: ...

    async def on_401(
        self,
        ep: Endpoint,
        ref: Reference,
        scope: str,
        resp: aiohttp.ClientResponse,
        counter: ByteCounter | None,
        att: Attempt,
    ) -> None: ...


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_detail(body: bytes) -> str:
    """The distribution error JSON's codes/messages, else a short body excerpt."""
    try:
        doc = json.loads(body)
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list) and errs:
            return "; ".join(
                f"{e.get('code', '?')}: {e.get('message', '')}" for e in errs if isinstance(e, dict)
            )
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:200].decode("utf-8", errors="replace").strip()


class Transport:
    """See the module docstring. ``auth`` may be set after construction (it uses us)."""

    def __init__(
        self,
        settings: RegistrySettings,
        auth: AuthSource | None = None,
        *,
        proxies: ProxyConfig | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.proxies = proxies or ProxyConfig()
        self._session: aiohttp.ClientSession | None = None
        self._hosts: dict[str, _HostState] = {}
        self._blob_urls: dict[tuple[str, str, str], str] = {}
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def attempt(self) -> Attempt:
        """The budget of a new public call (``deadline_s`` from now)."""
        return Attempt(asyncio.get_running_loop().time() + self.settings.deadline_s)

    def single_range(self, host: str) -> bool:
        return self._host(host).single_range

    def set_single_range(self, host: str) -> None:
        self._host(host).single_range = True

    def _session_for_request(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RegistryError("registry client is closed")
        if self._session is None:
            s = self.settings
            connector = aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=s.max_per_host)
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Layer blobs are gzip/zstd bytes we must see verbatim.
                auto_decompress=False,
                headers={"User-Agent": s.user_agent},
            )
        return self._session

    def _host(self, host: str) -> _HostState:
        st = self._hosts.get(host)
        if st is None:
            st = self._hosts[host] = _HostState(
                asyncio.Semaphore(self.settings.max_per_host), HostHealth(host, self.settings)
            )
        return st

    def health(self, host: str) -> HostHealth:
        """What ``host`` ("name[:port]") has been doing (created on first use)."""
        return self._host(host).health

    def host_stats(self) -> dict[str, dict[str, object]]:
        """Per registry host: requests, retries, hedges, stalls, faults, speed (/status)."""
        return {h: st.health.as_dict() for h, st in sorted(self._hosts.items())}

    # ------------------------------------------------------------ the request loop

    async def call(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        url: str,
        handler: Handler[T],
        counter: ByteCounter | None,
        att: Attempt,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | dict[str, str] | None = None,
        redirect_key: str | None = None,
        scope: str | None = None,
        auth: bool = True,
        follow_redirects: bool = True,
        label: str | None = None,
        encoded_url: bool = False,
    ) -> T:
        """One logical request: auth, redirects, retries. ``handler`` sees the final response
        (any status but 401/3xx/retryable when ``auth``/``follow_redirects``) and reads the
        body; errors it raises while reading (reset, truncation, timeout) are retried like
        the request itself. ``scope`` defaults to pulling ``ep.repository``; ``data`` is a
        request body (resent on a retry); ``label`` names the server in messages (default:
        its host); ``encoded_url``: ``url`` is already percent-encoded (a token query)."""
        loop = asyncio.get_running_loop()
        s = self.settings
        scope = scope or repository_scope(ep.repository)
        cache_key = (ep.host, ep.repository, redirect_key) if redirect_key else None
        target = self._blob_urls.get(cache_key, url) if cache_key else url
        reauthed = False
        redirect_reresolved = False
        hops = 0
        while True:
            remaining = att.deadline - loop.time()
            tgt = URL(target, encoded=encoded_url and target == url)
            where = tgt.host_port_subcomponent or ""
            name = label or where
            if remaining <= 0:
                raise Transient(
                    f"{ref}: {method} {URL(url).path} on {label or ep.host}: deadline of "
                    f"{s.deadline_s:g}s exceeded ({'; '.join(att.errors) or 'no answer'})"
                )
            same_host = where == URL(url).host_port_subcomponent
            h = dict(headers or {})
            if auth and same_host and self.auth is not None:
                value = await self.auth.header(ep, ref, scope, counter, att)
                if value:
                    h["Authorization"] = value
            elif not same_host:
                # Never hand the registry's credentials to a redirect target
                # (developer-notes/protocol.md, "Registry").
                h.pop("Authorization", None)
            timeout = aiohttp.ClientTimeout(
                total=min(s.request_timeout_s, remaining), sock_connect=s.connect_timeout_s
            )
            err: Transient
            try:
                proxy = self.proxies.proxy_for(str(tgt))
                proxy_auth = None
                if proxy is not None and proxy.username is not None:
                    proxy_auth = aiohttp.BasicAuth(proxy.username, proxy.password or "")
                host = self._host(where)
                async with host.sem:
                    if counter is not None:
                        counter.add_request()
                    host.health.requests += 1
                    t_sent = loop.time()
                    async with self._session_for_request().request(
                        method, tgt, headers=h, data=data, allow_redirects=False, timeout=timeout,
                        proxy=proxy.url if proxy else None, proxy_auth=proxy_auth,
                    ) as resp:  # fmt: skip
                        status = resp.status
                        if status < 500 and status != 429:
                            host.health.observe_ttfb(loop.time() - t_sent)
                        log.debug(
                            "%s %s%s%s%s -> %d after %.0f ms",
                            method,
                            where,
                            tgt.path,
                            f" [{h['Range']}]" if "Range" in h else "",
                            f" via {proxy.url}" if proxy else "",
                            status,
                            (loop.time() - t_sent) * 1000,
                        )
                        if auth and status == 401 and same_host and self.auth is not None:
                            await self.drain(resp, counter)
                            if reauthed:
                                raise Unauthorized(
                                    f"{ref}: {ep.host} refused access (401) even after "
                                    "authenticating; check the credentials for "
                                    f"{ep.registry}/{ep.repository}"
                                )
                            await self.auth.on_401(ep, ref, scope, resp, counter, att)
                            reauthed = True
                            continue
                        if follow_redirects and 300 <= status < 400 and "Location" in resp.headers:
                            await self.drain(resp, counter)
                            hops += 1
                            if hops > _MAX_REDIRECTS:
                                raise RegistryError(f"{ref}: too many redirects from {ep.host}")
                            target = str(tgt.join(URL(resp.headers["Location"])))
                            if cache_key is not None:
                                self._blob_urls[cache_key] = target
                            continue
                        if status == 403 and target != url and not redirect_reresolved:
                            # A cached pre-signed URL expired: ask the registry again.
                            await self.drain(resp, counter)
                            if cache_key is not None:
                                self._blob_urls.pop(cache_key, None)
                            target, redirect_reresolved, hops = url, True, 0
                            continue
                        if status in _RETRY_STATUS:
                            body = await self.read_body(resp, counter, _ERROR_BODY_BYTES, ref, ep)
                            raise Transient(
                                f"{ref}: {method} {tgt.path} on {name}: HTTP {status} "
                                f"{error_detail(body)}".rstrip(),
                                retry_after=retry_after(resp.headers.get("Retry-After")),
                            )
                        return await handler(resp)
            except BodyBroke as exc:
                err, kind = exc, exc.kind
            except Transient as exc:
                err, kind = exc, "http" if "HTTP" in str(exc) else "transient"
            except aiohttp.ClientConnectorDNSError as exc:
                what = label or f"host {where}"
                raise RegistryError(f"{ref}: cannot resolve {what}: {exc.os_error}") from exc
            except aiohttp.ClientConnectorError as exc:
                err = Transient(f"{ref}: cannot connect to {name}: {exc.os_error}")
                kind = "connect"
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                err = BodyBroke(
                    f"{ref}: {name}: connection broke during the answer: {exc}", "reset"
                )
            except aiohttp.ClientResponseError as exc:
                err, kind = Transient(f"{ref}: {name}: bad HTTP answer: {exc.message}"), "http"
            except (aiohttp.ClientError, ConnectionError) as exc:
                err = BodyBroke(f"{ref}: {name}: {type(exc).__name__}: {exc}", "reset")
            except TimeoutError:
                err = Transient(
                    f"{ref}: {method} {tgt.path} on {name}: no answer within "
                    f"{min(s.request_timeout_s, remaining):g}s"
                )
                kind = "timeout"
            if isinstance(err, BodyBroke):
                kind = err.kind
            health = self._host(where).health
            health.fault(kind)
            att.errors.append(str(err).removeprefix(f"{ref}: "))
            att.retries += 1
            if att.retries > s.max_retries:
                health.note("%s: giving up after %d retries: %s", where, s.max_retries, err)
                raise Transient(
                    f"{err} (gave up after {s.max_retries} retries)", retry_after=err.retry_after
                )
            # A broken body is a lost connection, not a busy server: ask again at once.
            delay = 0.0 if isinstance(err, BodyBroke) else self._backoff_delay(att, err)
            if loop.time() + delay > att.deadline:
                raise Transient(
                    f"{err} (no retry: waiting {delay:.1f}s would pass the deadline)",
                    retry_after=err.retry_after,
                )
            health.retries += 1
            why = str(err).removeprefix(f"{ref}: ")
            health.note(
                "%s: retry %d of %s %s in %.1fs (%s): %s",
                where, att.retries, method, tgt.path, delay, kind, why,
            )  # fmt: skip
            if delay > 0:
                await asyncio.sleep(delay)

    async def call_hedged(
        self,
        ep: Endpoint,
        ref: Reference,
        url: str,
        handler: Handler[T],
        counter: ByteCounter | None,
        att: Attempt,
        *,
        expect_bytes: int,
        **kw: Any,
    ) -> T:
        """A GET like :meth:`call` (same arguments), hedged: when it has not finished
        :meth:`HostHealth.hedge_after_s` (for ``expect_bytes``) after it started, a second
        identical call starts; the first to succeed wins and the other is cancelled. Both
        share ``att``: its deadline and retry budget bound the pair. For idempotent reads
        whose ``handler`` keeps no state between calls."""
        loop = asyncio.get_running_loop()
        host = URL(url).host_port_subcomponent or ep.host
        health = self._host(host).health
        hedge_after = health.hedge_after_s(expect_bytes)

        def start() -> asyncio.Task[T]:
            return asyncio.ensure_future(
                self.call(ep, ref, "GET", url, handler, counter, att, **kw)
            )

        first = start()
        tasks = [first]
        try:
            done, _ = await asyncio.wait(tasks, timeout=hedge_after)
            if not done and att.deadline - loop.time() > hedge_after:
                health.hedges += 1
                health.note(
                    "%s: hedging GET %s: no answer after %.1fs (usually %.2fs for %d bytes)",
                    host, URL(url).path, hedge_after, health.expected_s(expect_bytes),
                    expect_bytes,
                )  # fmt: skip
                tasks.append(start())
            pending = set(tasks)
            first_error: BaseException | None = None
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in tasks:
                    if t not in done:
                        continue
                    exc = t.exception()
                    if exc is None:
                        if t is not first:
                            health.hedges_won += 1
                        return t.result()
                    first_error = first_error or exc
            assert first_error is not None
            raise first_error
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t

    def _backoff_delay(self, att: Attempt, err: Transient) -> float:
        """The wait before retry number ``att.retries`` (already counted): exponential,
        jittered, and never shorter than the server's ``Retry-After``."""
        s = self.settings
        delay: float = min(s.backoff_max_s, s.backoff_min_s * 2 ** (att.retries - 1))
        delay *= random.uniform(1.0, 1.5)  # jitter: spread the herd of parallel readers
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)
        return delay

    # ------------------------------------------------------------ for handlers

    async def read_body(
        self,
        resp: aiohttp.ClientResponse,
        counter: ByteCounter | None,
        limit: int | None,
        ref: Reference,
        ep: Endpoint,
    ) -> bytes:
        """The whole body (counted); RegistryError beyond ``limit`` bytes, BodyBroke (a
        Transient, retried at once) when shorter than its Content-Length or when no byte
        came for the host's :meth:`~HostHealth.stall_after_s`."""
        health = self._host(resp.url.host_port_subcomponent or "").health
        stall_s = health.stall_after_s()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        buf = bytearray()
        while True:
            try:
                # asyncio.timeout, not wait_for: no task of its own, so the request's own
                # timeout (aiohttp's, on this task) stays told apart from a stall.
                async with asyncio.timeout(stall_s) as stall:
                    chunk = await resp.content.readany()
            except TimeoutError:
                if not stall.expired():
                    raise
                health.stalls += 1
                resp.close()
                raise BodyBroke(
                    f"{ref}: {ep.host}: body of {resp.url.path} stalled: no byte for "
                    f"{stall_s:.1f}s after {len(buf)} bytes",
                    "stall",
                ) from None
            if not chunk:
                break
            if counter is not None:
                counter.add(len(chunk))
            buf += chunk
            if limit is not None and len(buf) > limit:
                resp.close()
                raise RegistryError(
                    f"{ref}: answer from {ep.host} for {resp.url.path} exceeds {limit} bytes"
                )
        if resp.content_length is not None and len(buf) != resp.content_length:
            raise BodyBroke(
                f"{ref}: {ep.host}: body of {resp.url.path} truncated: "
                f"{len(buf)} of {resp.content_length} bytes",
                "truncated",
            )
        health.observe_body(len(buf), loop.time() - t0)
        return bytes(buf)

    async def drain(self, resp: aiohttp.ClientResponse, counter: ByteCounter | None) -> None:
        """Read and drop the body (counted), so the connection can be reused."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async for chunk in resp.content.iter_any():
                if counter is not None:
                    counter.add(len(chunk))

    async def raise_status(
        self,
        resp: aiohttp.ClientResponse,
        ref: Reference,
        ep: Endpoint,
        what: str,
        counter: ByteCounter | None,
    ) -> NoReturn:
        """Raise NotFound / Unauthorized / RegistryError for ``resp`` (with the registry's
        error detail)."""
        body = b""
        with contextlib.suppress(AlsdError, aiohttp.ClientError, TimeoutError):
            body = await self.read_body(resp, counter, _ERROR_BODY_BYTES, ref, ep)
        detail = error_detail(body)
        msg = f"{ref}: {what} on {ep.host}: HTTP {resp.status} {resp.reason or ''}".rstrip()
        if detail:
            msg += f" ({detail})"
        if resp.status == 404:
            raise NotFound(msg)
        if resp.status in (401, 403):
            raise Unauthorized(msg)
        raise RegistryError(msg)
