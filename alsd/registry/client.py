"""The registry client: resolve images, authenticate, read blob sizes and byte ranges.

One :class:`RegistryClient` owns one aiohttp ``ClientSession`` (created lazily inside the
running loop) with a bounded connection pool. It knows nothing of FUSE. Everything it
needs comes through the constructor: settings, the registries.conf view (mirrors,
insecure, blocked) and a credential source — no global state.

Behaviour (spec.md §5): endpoints are tried in registries.conf order (mirrors, then the
registry); authentication follows containerd (anonymous or credentialed Bearer tokens,
POST then GET fallback; Basic), with a token cache per (host, scope) that honours
``expires_in`` and is renewed on a 401; redirects are followed by hand and
``Authorization`` is never sent to another host; a blob's redirect target is cached and
re-resolved on a 403; retries with exponential backoff and jitter on connection errors,
429 and 5xx (``Retry-After`` honoured), each bounded by ``max_retries`` and by an overall
deadline per call; multi-range GETs with a permanent per-host switch to single-range
mode after a 400. Every body byte read is added to the caller's :class:`ByteCounter`.

Concurrency: all methods are coroutines on one event loop. Shared state (token cache,
per-host state, redirect cache) is only mutated between awaits, so it needs no lock,
except token fetches, which are serialised per (host, scope) so that N concurrent 401s
cost one token request. A per-host semaphore bounds concurrent requests to a host.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import aiohttp
from yarl import URL

from alsd.config import RegistrySettings
from alsd.counters import ByteCounter
from alsd.errors import (
    AlsdError,
    FormatError,
    IntegrityError,
    NotFound,
    RegistryError,
    Transient,
    Unauthorized,
)
from alsd.oci.auth import (
    Challenge,
    Credentials,
    basic_authorization,
    parse_token_response,
    parse_www_authenticate,
    repository_scope,
    token_request,
)
from alsd.oci.manifest import (
    ACCEPT_MANIFESTS,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    parse_config,
    parse_manifest,
    select_platform,
    sha256_digest,
    verify_digest,
)
from alsd.oci.ranges import (
    check_ranges,
    merge_ranges,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
    range_header,
    slice_ranges,
)
from alsd.oci.reference import Reference, parse_reference
from alsd.registry.authfile import CredentialSource
from alsd.registry.regconf import Endpoint, RegistriesConf

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_REDIRECTS = 5
# 501 Not Implemented will not get better by asking again (go-retryablehttp agrees).
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504, 505, 506, 507, 508, 509, 510, 511, 599})


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    reference: Reference
    manifest_digest: str  # the platform manifest's digest
    manifest: Manifest
    manifest_bytes: bytes
    config: ImageConfig
    config_bytes: bytes
    index_digest: str | None = None  # set when the reference named an index
    endpoint: Endpoint | None = None  # where the manifest came from


@dataclass
class _HostState:
    sem: asyncio.Semaphore
    challenge: Challenge | None = None
    basic_header: str | None = None
    single_range: bool = False


class _SwitchToSingleRange(Exception):
    pass


@dataclass
class _Attempt:
    """Per-call retry bookkeeping."""

    deadline: float
    retries: int = 0
    errors: list[str] = field(default_factory=list)


def _retry_after(value: str | None) -> float | None:
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


def _error_detail(body: bytes) -> str:
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
    text = body[:200].decode("utf-8", errors="replace").strip()
    return text


class RegistryClient:
    """See the module docstring. Use ``async with RegistryClient(...)`` or call :meth:`close`."""

    def __init__(
        self,
        settings: RegistrySettings | None = None,
        *,
        registries: RegistriesConf | None = None,
        credentials: CredentialSource | None = None,
        platform: Platform | None = None,
    ) -> None:
        self.settings = settings or RegistrySettings()
        self.registries = registries or RegistriesConf()
        self.credentials = credentials
        self.platform = platform
        self._session: aiohttp.ClientSession | None = None
        self._hosts: dict[str, _HostState] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._blob_urls: dict[tuple[str, str, str], str] = {}
        self._preferred: dict[str, Endpoint] = {}  # ref.name -> endpoint that served it
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
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
            st = self._hosts[host] = _HostState(asyncio.Semaphore(self.settings.max_per_host))
        return st

    # ------------------------------------------------------------ public API

    async def resolve(
        self, ref: Reference | str, *, counter: ByteCounter | None = None
    ) -> ResolvedImage:
        """Fetch the manifest (choosing the platform from an index) and the config."""
        r = _as_ref(ref)
        att = self._attempt()
        return await self._over_endpoints(r, None, lambda ep: self._resolve_at(ep, r, counter, att))

    async def blob_size(
        self, ref: Reference | str, digest: str, *, counter: ByteCounter | None = None
    ) -> int:
        r = _as_ref(ref)
        att = self._attempt()
        return await self._over_endpoints(
            r, digest, lambda ep: self._blob_size_at(ep, r, digest, counter, att)
        )

    async def read_ranges(
        self,
        ref: Reference | str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        counter: ByteCounter | None = None,
    ) -> list[bytes]:
        """The bytes of each ``(start, end)`` (end exclusive) of a blob, in the given order."""
        check_ranges(ranges)
        if not ranges:
            return []
        r = _as_ref(ref)
        att = self._attempt()
        return await self._over_endpoints(
            r, digest, lambda ep: self._read_ranges_at(ep, r, digest, ranges, counter, att)
        )

    async def read_blob(
        self, ref: Reference | str, digest: str, *, counter: ByteCounter | None = None
    ) -> AsyncIterator[bytes]:
        """Stream a whole blob in segments; raises IntegrityError at the end on a bad digest.

        Each segment is one range request with its own retries, so a connection lost
        in the middle costs one segment, not the whole blob.
        """
        r = _as_ref(ref)
        size = await self.blob_size(r, digest, counter=counter)
        algo = digest.partition(":")[0]
        try:
            h = hashlib.new(algo)
        except ValueError as exc:
            raise IntegrityError(f"{r}: blob {digest}: unsupported digest algorithm") from exc
        seg = self.settings.blob_segment_bytes
        for off in range(0, size, seg):
            (data,) = await self.read_ranges(
                r, digest, [(off, min(off + seg, size))], counter=counter
            )
            h.update(data)
            yield data
        if f"{algo}:{h.hexdigest()}" != digest:
            raise IntegrityError(
                f"{r}: blob {digest} from registry has digest {algo}:{h.hexdigest()}"
            )

    async def fetch_blob(
        self,
        ref: Reference | str,
        digest: str,
        *,
        max_bytes: int,
        counter: ByteCounter | None = None,
    ) -> bytes:
        """A small blob (config, TOC image) in one GET, digest verified."""
        r = _as_ref(ref)
        att = self._attempt()
        return await self._over_endpoints(
            r, digest, lambda ep: self._fetch_blob_at(ep, r, digest, max_bytes, counter, att)
        )

    async def request(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        url: str,
        handler: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        scopes: Sequence[str] = (),
        counter: ByteCounter | None = None,
    ) -> T:
        """One request to ``ep`` with this client's auth, redirects, retries and deadline.

        The hook for other protocol users (the pusher): ``handler`` sees the final response
        as in ``_call``. ``scopes`` are token scopes (default: pull ``ep.repository``); a
        pusher asks for ``repository:NAME:push,pull``. ``data`` is resent on a retry, so
        only idempotent requests (or ones whose handler copes) should be sent this way.
        """
        return await self._call(
            ep,
            ref,
            method,
            url,
            dict(headers or {}),
            handler,
            counter,
            self._attempt(),
            scope=" ".join(scopes) or None,
            data=data,
        )

    async def raise_for_status(
        self,
        resp: aiohttp.ClientResponse,
        ref: Reference,
        ep: Endpoint,
        what: str,
        counter: ByteCounter | None = None,
    ) -> NoReturn:
        """Raise NotFound / Unauthorized / RegistryError for ``resp`` (with the registry's
        error detail); the public face of the mapping every request of this client uses."""
        await self._raise_status(resp, ref, ep, what, counter)

    # ------------------------------------------------------------ endpoints

    def _attempt(self) -> _Attempt:
        return _Attempt(asyncio.get_running_loop().time() + self.settings.deadline_s)

    async def _over_endpoints(
        self,
        ref: Reference,
        blob: str | None,
        fn: Callable[[Endpoint], Awaitable[T]],
    ) -> T:
        eps = self.registries.endpoints(ref)
        pref = self._preferred.get(ref.name)
        if blob is not None and pref is not None and pref in eps:
            eps.remove(pref)
            eps.insert(0, pref)
        failures: list[str] = []
        for i, ep in enumerate(eps):
            try:
                result = await fn(ep)
            except (RegistryError, IntegrityError, FormatError) as exc:
                if i == len(eps) - 1:
                    if failures:
                        # Keep the registry's own error class; mention the mirrors.
                        exc.args = (f"{exc} (mirrors failed too: {'; '.join(failures)})",)
                    raise
                log.info("%s: endpoint %s failed, trying the next: %s", ref, ep.host, exc)
                failures.append(f"{ep.host}: {exc}")
                continue
            if blob is None:
                self._preferred[ref.name] = ep
            return result
        raise AssertionError("endpoints() returns at least the registry itself")

    # ------------------------------------------------------------ operations at one endpoint

    async def _get_manifest(
        self, ep: Endpoint, ref: Reference, obj: str, counter: ByteCounter | None, att: _Attempt
    ) -> tuple[bytes, str | None, str | None]:
        limit = self.settings.max_manifest_bytes

        async def handler(resp: aiohttp.ClientResponse) -> tuple[bytes, str | None, str | None]:
            if resp.status != 200:
                await self._raise_status(resp, ref, ep, f"manifest {obj}", counter)
            body = await self._read_body(resp, counter, limit, ref, ep)
            return body, resp.headers.get("Content-Type"), resp.headers.get("Docker-Content-Digest")

        return await self._call(
            ep,
            ref,
            "GET",
            ep.url("manifests", obj),
            {"Accept": ACCEPT_MANIFESTS},
            handler,
            counter,
            att,
        )

    async def _resolve_at(
        self, ep: Endpoint, ref: Reference, counter: ByteCounter | None, att: _Attempt
    ) -> ResolvedImage:
        body, ctype, hdr_digest = await self._get_manifest(ep, ref, ref.object, counter, att)
        where = f"{ref}: manifest from {ep.host}"
        if ref.digest is not None:
            verify_digest(body, ref.digest, where)
            digest = ref.digest
        else:
            digest = sha256_digest(body)
            if hdr_digest and hdr_digest.startswith("sha256:") and hdr_digest != digest:
                raise IntegrityError(
                    f"{where}: Docker-Content-Digest says {hdr_digest}, content is {digest}"
                )
        try:
            parsed = parse_manifest(body, ctype)
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from exc
        index_digest: str | None = None
        if isinstance(parsed, Index):
            index_digest = digest
            try:
                desc = select_platform(parsed, self.platform)
            except FormatError as exc:
                raise NotFound(f"{ref}: on {ep.host}: {exc}") from exc
            body, ctype, _ = await self._get_manifest(ep, ref, desc.digest, counter, att)
            verify_digest(body, desc.digest, f"{ref}: platform manifest from {ep.host}")
            digest = desc.digest
            try:
                parsed = parse_manifest(body, ctype or desc.media_type)
            except FormatError as exc:
                raise FormatError(f"{where}: {exc}") from exc
            if not isinstance(parsed, Manifest):
                raise FormatError(f"{where}: nested index {desc.digest} is not supported")
        config_bytes = await self._fetch_blob_at(
            ep, ref, parsed.config.digest, self.settings.max_config_bytes, counter, att
        )
        try:
            config = parse_config(config_bytes)
        except FormatError as exc:
            raise FormatError(f"{ref}: config {parsed.config.digest}: {exc}") from exc
        return ResolvedImage(ref, digest, parsed, body, config, config_bytes, index_digest, ep)

    async def _fetch_blob_at(
        self,
        ep: Endpoint,
        ref: Reference,
        digest: str,
        max_bytes: int,
        counter: ByteCounter | None,
        att: _Attempt,
    ) -> bytes:
        async def handler(resp: aiohttp.ClientResponse) -> bytes:
            if resp.status != 200:
                await self._raise_status(resp, ref, ep, f"blob {digest}", counter)
            return await self._read_body(resp, counter, max_bytes, ref, ep)

        data = await self._call(
            ep,
            ref,
            "GET",
            ep.url("blobs", digest),
            {},
            handler,
            counter,
            att,
            redirect_key=digest,
        )
        verify_digest(data, digest, f"{ref}: blob from {ep.host}")
        return data

    async def _blob_size_at(
        self, ep: Endpoint, ref: Reference, digest: str, counter: ByteCounter | None, att: _Attempt
    ) -> int:
        url = ep.url("blobs", digest)

        async def head(resp: aiohttp.ClientResponse) -> int | None:
            await self._drain(resp, counter)
            if resp.status == 200 and resp.content_length is not None:
                return resp.content_length
            if resp.status == 404:
                await self._raise_status(resp, ref, ep, f"blob {digest}", counter)
            return None  # e.g. S3 backends that refuse HEAD: ask with a tiny GET instead

        size = await self._call(ep, ref, "HEAD", url, {}, head, counter, att, redirect_key=digest)
        if size is not None:
            return size

        async def get01(resp: aiohttp.ClientResponse) -> int:
            if resp.status == 206:
                await self._drain(resp, counter)
                cr = parse_content_range(resp.headers.get("Content-Range", ""))
                if cr.total is None:
                    raise RegistryError(f"{ref}: blob {digest} on {ep.host}: size unknown ('*')")
                return cr.total
            if resp.status == 200 and resp.content_length is not None:
                # Closing the connection instead of reading a whole blob to learn its size.
                resp.close()
                return resp.content_length
            await self._raise_status(resp, ref, ep, f"blob {digest}", counter)

        return await self._call(
            ep, ref, "GET", url, {"Range": "bytes=0-1"}, get01, counter, att, redirect_key=digest
        )

    async def _read_ranges_at(
        self,
        ep: Endpoint,
        ref: Reference,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        counter: ByteCounter | None,
        att: _Attempt,
    ) -> list[bytes]:
        merged = merge_ranges(ranges)
        st = self._host(ep.host)
        if st.single_range or len(merged) == 1:
            groups = [[(merged[0][0], merged[-1][1])]]
        else:
            n = self.settings.max_ranges_per_request
            groups = [merged[i : i + n] for i in range(0, len(merged), n)]
        results = await asyncio.gather(
            *(self._fetch_group(ep, ref, digest, g, counter, att) for g in groups)
        )
        parts = [p for r in results for p in r]
        return slice_ranges(parts, ranges)

    async def _fetch_group(
        self,
        ep: Endpoint,
        ref: Reference,
        digest: str,
        group: list[tuple[int, int]],
        counter: ByteCounter | None,
        att: _Attempt,
    ) -> list[tuple[int, bytes]]:
        what = f"blob {digest}"

        async def handler(resp: aiohttp.ClientResponse) -> list[tuple[int, bytes]]:
            if resp.status == 206:
                body = await self._read_body(resp, counter, None, ref, ep)
                boundary = multipart_boundary(resp.headers.get("Content-Type", ""))
                try:
                    if boundary is not None:
                        return [
                            (cr.start, data)
                            for cr, data in parse_multipart_byteranges(body, boundary)
                        ]
                    cr = parse_content_range(resp.headers.get("Content-Range", ""))
                except RegistryError as exc:
                    raise RegistryError(f"{ref}: {what} on {ep.host}: {exc}") from exc
                if len(body) != cr.length:
                    raise Transient(
                        f"{ref}: {what} on {ep.host}: body has {len(body)} of {cr.length} bytes"
                    )
                return [(cr.start, body)]
            if resp.status == 200:
                # The registry ignored Range: the whole blob is the answer.
                return [(0, await self._read_body(resp, counter, None, ref, ep))]
            if resp.status == 400 and len(group) > 1:
                await self._drain(resp, counter)
                raise _SwitchToSingleRange
            await self._raise_status(resp, ref, ep, what, counter)

        try:
            return await self._call(
                ep,
                ref,
                "GET",
                ep.url("blobs", digest),
                {"Range": range_header(group), "Accept-Encoding": "identity"},
                handler,
                counter,
                att,
                redirect_key=digest,
            )
        except _SwitchToSingleRange:
            log.info("%s answered 400 to a multi-range request: single ranges from now", ep.host)
            self._host(ep.host).single_range = True
            return await self._fetch_group(
                ep, ref, digest, [(group[0][0], group[-1][1])], counter, att
            )

    # ------------------------------------------------------------ HTTP core

    async def _call(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        url: str,
        headers: dict[str, str],
        handler: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        counter: ByteCounter | None,
        att: _Attempt,
        *,
        redirect_key: str | None = None,
        scope: str | None = None,
        data: bytes | None = None,
    ) -> T:
        """One logical request: auth, redirects, retries. ``handler`` sees the final response
        (any status but 401/3xx/retryable) and reads the body; errors it raises while
        reading (reset, truncation, timeout) are retried like the request itself.
        ``scope`` defaults to pulling ``ep.repository``; ``data`` is a request body."""
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
            if remaining <= 0:
                raise Transient(
                    f"{ref}: {method} {URL(url).path} on {ep.host}: deadline of "
                    f"{s.deadline_s:g}s exceeded ({'; '.join(att.errors) or 'no answer'})"
                )
            tgt = URL(target)
            where = tgt.host_port_subcomponent or ""
            same_host = where == URL(url).host_port_subcomponent
            h = dict(headers)
            if same_host:
                auth = await self._auth_header(ep, ref, scope, counter, att)
                if auth:
                    h["Authorization"] = auth
            else:
                # Never hand the registry's credentials to a redirect target (spec.md §5.4).
                h.pop("Authorization", None)
            timeout = self._timeout(remaining)
            err: Transient
            try:
                async with self._host(where).sem:
                    if counter is not None:
                        counter.add_request()
                    t_sent = loop.time()
                    async with self._get_session().request(
                        method, tgt, headers=h, data=data, allow_redirects=False, timeout=timeout
                    ) as resp:
                        status = resp.status
                        log.debug(
                            "%s %s%s%s -> %d after %.0f ms",
                            method,
                            where,
                            tgt.path,
                            f" [{h['Range']}]" if "Range" in h else "",
                            status,
                            (loop.time() - t_sent) * 1000,
                        )
                        if status == 401 and same_host:
                            await self._drain(resp, counter)
                            if reauthed:
                                raise Unauthorized(
                                    f"{ref}: {ep.host} refused access (401) even after "
                                    "authenticating; check the credentials for "
                                    f"{ep.registry}/{ep.repository}"
                                )
                            await self._on_401(ep, ref, scope, resp, counter, att)
                            reauthed = True
                            continue
                        if 300 <= status < 400 and "Location" in resp.headers:
                            await self._drain(resp, counter)
                            hops += 1
                            if hops > _MAX_REDIRECTS:
                                raise RegistryError(f"{ref}: too many redirects from {ep.host}")
                            target = str(tgt.join(URL(resp.headers["Location"])))
                            if cache_key is not None:
                                self._blob_urls[cache_key] = target
                            continue
                        if status == 403 and target != url and not redirect_reresolved:
                            # A cached pre-signed URL expired: ask the registry again.
                            await self._drain(resp, counter)
                            if cache_key is not None:
                                self._blob_urls.pop(cache_key, None)
                            target, redirect_reresolved, hops = url, True, 0
                            continue
                        if status in _RETRY_STATUS:
                            body = await self._read_body(resp, counter, 64 << 10, ref, ep)
                            raise Transient(
                                f"{ref}: {method} {tgt.path} on {where}: HTTP {status} "
                                f"{_error_detail(body)}".rstrip(),
                                retry_after=_retry_after(resp.headers.get("Retry-After")),
                            )
                        return await handler(resp)
            except Transient as exc:
                err = exc
            except aiohttp.ClientConnectorDNSError as exc:
                raise RegistryError(f"{ref}: cannot resolve host {where}: {exc.os_error}") from exc
            except aiohttp.ClientConnectorError as exc:
                err = Transient(f"{ref}: cannot connect to {where}: {exc.os_error}")
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                err = Transient(f"{ref}: {where}: connection broke during the answer: {exc}")
            except aiohttp.ClientResponseError as exc:
                err = Transient(f"{ref}: {where}: bad HTTP answer: {exc.message}")
            except (aiohttp.ClientError, ConnectionError) as exc:
                err = Transient(f"{ref}: {where}: {type(exc).__name__}: {exc}")
            except TimeoutError:
                err = Transient(
                    f"{ref}: {method} {tgt.path} on {where}: no answer within "
                    f"{min(s.request_timeout_s, remaining):g}s"
                )
            att.errors.append(str(err).removeprefix(f"{ref}: "))
            att.retries += 1
            if att.retries > s.max_retries:
                raise Transient(
                    f"{err} (gave up after {s.max_retries} retries)", retry_after=err.retry_after
                )
            delay = self._backoff_delay(att, err)
            if loop.time() + delay > att.deadline:
                raise Transient(
                    f"{err} (no retry: waiting {delay:.1f}s would pass the deadline)",
                    retry_after=err.retry_after,
                )
            log.debug("retrying in %.2fs: %s", delay, err)
            await asyncio.sleep(delay)

    def _timeout(self, remaining: float) -> aiohttp.ClientTimeout:
        """The timeout of one request: ``request_timeout_s``, cut short by the deadline."""
        s = self.settings
        return aiohttp.ClientTimeout(
            total=min(s.request_timeout_s, remaining), sock_connect=s.connect_timeout_s
        )

    def _backoff_delay(self, att: _Attempt, err: Transient) -> float:
        """The wait before retry number ``att.retries`` (already counted): exponential,
        jittered, and never shorter than the server's ``Retry-After``."""
        s = self.settings
        delay: float = min(s.backoff_max_s, s.backoff_min_s * 2 ** (att.retries - 1))
        delay *= random.uniform(1.0, 1.5)  # jitter: spread the herd of parallel readers
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)
        return delay

    async def _read_body(
        self,
        resp: aiohttp.ClientResponse,
        counter: ByteCounter | None,
        limit: int | None,
        ref: Reference,
        ep: Endpoint,
    ) -> bytes:
        buf = bytearray()
        async for chunk in resp.content.iter_any():
            if counter is not None:
                counter.add(len(chunk))
            buf += chunk
            if limit is not None and len(buf) > limit:
                resp.close()
                raise RegistryError(
                    f"{ref}: answer from {ep.host} for {resp.url.path} exceeds {limit} bytes"
                )
        if resp.content_length is not None and len(buf) != resp.content_length:
            raise Transient(
                f"{ref}: {ep.host}: body of {resp.url.path} truncated: "
                f"{len(buf)} of {resp.content_length} bytes"
            )
        return bytes(buf)

    async def _drain(self, resp: aiohttp.ClientResponse, counter: ByteCounter | None) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async for chunk in resp.content.iter_any():
                if counter is not None:
                    counter.add(len(chunk))

    async def _raise_status(
        self,
        resp: aiohttp.ClientResponse,
        ref: Reference,
        ep: Endpoint,
        what: str,
        counter: ByteCounter | None,
    ) -> NoReturn:
        body = b""
        with contextlib.suppress(AlsdError, aiohttp.ClientError, TimeoutError):
            body = await self._read_body(resp, counter, 64 << 10, ref, ep)
        detail = _error_detail(body)
        msg = f"{ref}: {what} on {ep.host}: HTTP {resp.status} {resp.reason or ''}".rstrip()
        if detail:
            msg += f" ({detail})"
        if resp.status == 404:
            raise NotFound(msg)
        if resp.status in (401, 403):
            raise Unauthorized(msg)
        raise RegistryError(msg)

    # ------------------------------------------------------------ authentication

    async def _credentials_for(self, ep: Endpoint) -> Credentials | None:
        if self.credentials is None:
            return None
        return await self.credentials.lookup(ep.registry, ep.repository)

    async def _auth_header(
        self,
        ep: Endpoint,
        ref: Reference,
        scope: str,
        counter: ByteCounter | None,
        att: _Attempt,
    ) -> str | None:
        st = self._host(ep.host)
        ch = st.challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            return st.basic_header
        key = (ep.host, scope)
        cached = self._tokens.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached[1] > time.monotonic():
                return f"Bearer {cached[0]}"
            token, expires_in = await self._fetch_token(ep, ref, ch, scope, counter, att)
            # Renew a little early so that a token does not expire in flight.
            margin = min(10.0, expires_in / 4)
            self._tokens[key] = (token, time.monotonic() + expires_in - margin)
            return f"Bearer {token}"

    async def _on_401(
        self,
        ep: Endpoint,
        ref: Reference,
        scope: str,
        resp: aiohttp.ClientResponse,
        counter: ByteCounter | None,
        att: _Attempt,
    ) -> None:
        challenges = parse_www_authenticate(resp.headers.getall("WWW-Authenticate", []))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            raise Unauthorized(
                f"{ref}: {ep.host} answered 401 without a usable challenge "
                f"({', '.join(c.scheme for c in challenges) or 'none'})"
            )
        ch = usable[0]
        st = self._host(ep.host)
        st.challenge = ch
        self._tokens.pop((ep.host, scope), None)  # whatever we had is no good any more
        if ch.scheme == "basic":
            creds = await self._credentials_for(ep)
            if creds is None or not creds.secret:
                raise Unauthorized(
                    f"{ref}: {ep.host} requires credentials (Basic) and none were found "
                    f"for {ep.registry}/{ep.repository}"
                )
            st.basic_header = basic_authorization(creds)

    async def _fetch_token(
        self,
        ep: Endpoint,
        ref: Reference,
        ch: Challenge,
        scope: str,
        counter: ByteCounter | None,
        att: _Attempt,
    ) -> tuple[str, float]:
        # ``scope`` may hold several space-separated scopes (the pusher asks for two repos).
        req = token_request(ch, scope.split())
        creds = await self._credentials_for(ep)
        realm = URL(req.realm)
        if realm.scheme not in ("http", "https") or not realm.host:
            raise Unauthorized(f"{ref}: {ep.host} sent a bad token realm {req.realm!r}")
        # The token server is its own host; treat it as a plain endpoint without auth.
        realm_ep = Endpoint(ep.registry, realm.host_port_subcomponent or "", realm.scheme, "")
        what = f"token from {realm.host}"

        async def read_token(resp: aiohttp.ClientResponse) -> tuple[str, float] | None:
            if resp.status == 200:
                body = await self._read_body(resp, counter, 1 << 20, ref, realm_ep)
                try:
                    tok = parse_token_response(body)
                except RegistryError as exc:
                    raise RegistryError(f"{ref}: {what}: {exc}") from exc
                return tok.token, tok.expires_in_s
            return None

        if creds is not None and creds.secret:

            async def post(resp: aiohttp.ClientResponse) -> tuple[str, float] | None:
                got = await read_token(resp)
                if got is None:
                    if resp.status in (400, 401, 404, 405):
                        await self._drain(resp, counter)
                        return None  # containerd falls back to GET for these
                    await self._raise_status(resp, ref, realm_ep, what, counter)
                return got

            got = await self._token_call(
                realm_ep,
                ref,
                "POST",
                req.realm,
                post,
                counter,
                att,
                data=req.post_form(creds),
            )
            if got is not None:
                return got

        async def get(resp: aiohttp.ClientResponse) -> tuple[str, float] | None:
            got = await read_token(resp)
            if got is None:
                if resp.status in (401, 403):
                    await self._drain(resp, counter)
                    who = "anonymous" if creds is None else f"user {creds.username or '<token>'}"
                    raise Unauthorized(
                        f"{ref}: token server {realm.host} refused {who} for {scope} "
                        f"(HTTP {resp.status})"
                    )
                await self._raise_status(resp, ref, realm_ep, what, counter)
            return got

        hdrs = {}
        if creds is not None and creds.secret:
            hdrs["Authorization"] = basic_authorization(creds)
        got = await self._token_call(
            realm_ep,
            ref,
            "GET",
            str(realm.update_query(req.get_params())),
            get,
            counter,
            att,
            headers=hdrs,
        )
        if got is None:
            raise Unauthorized(f"{ref}: no token from {realm.host}")
        return got

    async def _token_call(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        url: str,
        handler: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        counter: ByteCounter | None,
        att: _Attempt,
        *,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> T:
        """A request to a token server: retried like others, never redirected with auth."""
        loop = asyncio.get_running_loop()
        s = self.settings
        while True:
            remaining = att.deadline - loop.time()
            if remaining <= 0:
                raise Transient(f"{ref}: token server {ep.host}: deadline exceeded")
            timeout = self._timeout(remaining)
            try:
                if counter is not None:
                    counter.add_request()
                async with self._get_session().request(
                    method,
                    URL(url, encoded=True),
                    data=data,
                    headers=headers or {},
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    if resp.status in _RETRY_STATUS:
                        await self._drain(resp, counter)
                        raise Transient(
                            f"{ref}: token server {ep.host}: HTTP {resp.status}",
                            retry_after=_retry_after(resp.headers.get("Retry-After")),
                        )
                    return await handler(resp)
            except Transient as exc:
                err = exc
            except aiohttp.ClientConnectorDNSError as exc:
                raise RegistryError(f"{ref}: cannot resolve token server {ep.host}") from exc
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                err = Transient(f"{ref}: token server {ep.host}: {type(exc).__name__}: {exc}")
            att.retries += 1
            if att.retries > s.max_retries:
                raise err
            delay = self._backoff_delay(att, err)
            if loop.time() + delay > att.deadline:
                raise err
            await asyncio.sleep(delay)


def _as_ref(ref: Reference | str) -> Reference:
    return parse_reference(ref) if isinstance(ref, str) else ref
