"""The registry client: the distribution operations, over the endpoints of registries.conf.

:class:`RegistryClient` resolves images (manifest, platform chosen from an index,
config), reads blob sizes, byte ranges (multi-range GETs with a permanent per-host switch
to single-range mode after a 400), small blobs and whole blobs (in segments, digest
verified). Each public call tries the endpoints in registries.conf order (mirrors, then
the registry; a blob read prefers the endpoint that served the manifest) and has one
deadline and retry budget for all its requests. It knows nothing of FUSE. Everything it
needs comes through the constructor: settings, the registries.conf view (mirrors,
insecure, blocked), a credential source and the proxies (:mod:`alsd.registry.proxyenv`,
from the environment) — no global state.

HTTP (auth, redirects, retries, deadline, bounded bodies, error mapping) is
:mod:`alsd.registry.transport`; authentication is :mod:`alsd.registry.authorizer`. Every
body byte read is added to the caller's :class:`~alsd.counters.ByteCounter`.

Concurrency: all methods are coroutines on one event loop; shared state is only mutated
between awaits.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from alsd.config import RegistrySettings
from alsd.counters import ByteCounter
from alsd.errors import FormatError, IntegrityError, NotFound, RegistryError, Transient
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
from alsd.registry.authorizer import Authorizer
from alsd.registry.proxyenv import ProxyConfig
from alsd.registry.regconf import Endpoint, RegistriesConf
from alsd.registry.transport import Attempt, Transport
from alsd.registry.wholeblobs import WholeBlobs

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class _SwitchToSingleRange(Exception):
    pass


class RegistryClient:
    """See the module docstring. Use ``async with RegistryClient(...)`` or call :meth:`close`."""

    def __init__(
        self,
        settings: RegistrySettings | None = None,
        *,
        registries: RegistriesConf | None = None,
        credentials: CredentialSource | None = None,
        platform: Platform | None = None,
        proxies: ProxyConfig | None = None,
    ) -> None:
        self.settings = settings or RegistrySettings()
        self.registries = registries or RegistriesConf()
        self.platform = platform
        self.transport = Transport(self.settings, proxies=proxies)
        self.authorizer = Authorizer(self.transport, credentials)
        self.transport.auth = self.authorizer
        self._preferred: dict[str, Endpoint] = {}  # ref.name -> endpoint that served it
        # Whole blobs sent for a range request (a pull-through cache still filling).
        self._whole = WholeBlobs(
            self.settings.whole_blob_keep_bytes, self.settings.whole_blob_keep_s
        )

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    # ------------------------------------------------------------ public API

    async def resolve(
        self, ref: Reference | str, *, counter: ByteCounter | None = None
    ) -> ResolvedImage:
        """Fetch the manifest (choosing the platform from an index) and the config."""
        r = _as_ref(ref)
        att = self.transport.attempt()
        return await self._over_endpoints(r, None, lambda ep: self._resolve_at(ep, r, counter, att))

    async def blob_size(
        self, ref: Reference | str, digest: str, *, counter: ByteCounter | None = None
    ) -> int:
        r = _as_ref(ref)
        att = self.transport.attempt()
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
        whole = self._whole.get(digest)
        if whole is not None and max(end for _, end in ranges) <= len(whole):
            return slice_ranges([(0, whole)], ranges)
        r = _as_ref(ref)
        att = self.transport.attempt()
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
        att = self.transport.attempt()
        return await self._over_endpoints(
            r, digest, lambda ep: self._fetch_blob_at(ep, r, digest, max_bytes, counter, att)
        )

    # ------------------------------------------------------------ endpoints

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
        self, ep: Endpoint, ref: Reference, obj: str, counter: ByteCounter | None, att: Attempt
    ) -> tuple[bytes, str | None, str | None]:
        limit = self.settings.max_manifest_bytes

        async def handler(resp: aiohttp.ClientResponse) -> tuple[bytes, str | None, str | None]:
            if resp.status != 200:
                await self.transport.raise_status(resp, ref, ep, f"manifest {obj}", counter)
            body = await self.transport.read_body(resp, counter, limit, ref, ep)
            return body, resp.headers.get("Content-Type"), resp.headers.get("Docker-Content-Digest")

        return await self.transport.call(
            ep,
            ref,
            "GET",
            ep.url("manifests", obj),
            handler,
            counter,
            att,
            headers={"Accept": ACCEPT_MANIFESTS},
        )

    async def _resolve_at(
        self, ep: Endpoint, ref: Reference, counter: ByteCounter | None, att: Attempt
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
        att: Attempt,
    ) -> bytes:
        async def handler(resp: aiohttp.ClientResponse) -> bytes:
            if resp.status != 200:
                await self.transport.raise_status(resp, ref, ep, f"blob {digest}", counter)
            return await self.transport.read_body(resp, counter, max_bytes, ref, ep)

        data = await self.transport.call(
            ep, ref, "GET", ep.url("blobs", digest), handler, counter, att, redirect_key=digest
        )
        verify_digest(data, digest, f"{ref}: blob from {ep.host}")
        return data

    async def _blob_size_at(
        self, ep: Endpoint, ref: Reference, digest: str, counter: ByteCounter | None, att: Attempt
    ) -> int:
        url = ep.url("blobs", digest)

        async def head(resp: aiohttp.ClientResponse) -> int | None:
            await self.transport.drain(resp, counter)
            if resp.status == 200 and resp.content_length is not None:
                return resp.content_length
            if resp.status == 404:
                await self.transport.raise_status(resp, ref, ep, f"blob {digest}", counter)
            return None  # e.g. S3 backends that refuse HEAD: ask with a tiny GET instead

        size = await self.transport.call(
            ep, ref, "HEAD", url, head, counter, att, redirect_key=digest
        )
        if size is not None:
            return size

        async def get01(resp: aiohttp.ClientResponse) -> int:
            if resp.status == 206:
                await self.transport.drain(resp, counter)
                cr = parse_content_range(resp.headers.get("Content-Range", ""))
                if cr.total is None:
                    raise RegistryError(f"{ref}: blob {digest} on {ep.host}: size unknown ('*')")
                return cr.total
            if resp.status == 200 and resp.content_length is not None:
                # Closing the connection instead of reading a whole blob to learn its size.
                resp.close()
                return resp.content_length
            await self.transport.raise_status(resp, ref, ep, f"blob {digest}", counter)

        return await self.transport.call(
            ep, ref, "GET", url, get01, counter, att,
            headers={"Range": "bytes=0-1"}, redirect_key=digest,
        )  # fmt: skip

    async def _read_ranges_at(
        self,
        ep: Endpoint,
        ref: Reference,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        counter: ByteCounter | None,
        att: Attempt,
    ) -> list[bytes]:
        merged = merge_ranges(ranges)
        if self.transport.single_range(ep.host) or len(merged) == 1:
            groups = [[(merged[0][0], merged[-1][1])]]
        else:
            n = self.settings.max_ranges_per_request
            groups = [merged[i : i + n] for i in range(0, len(merged), n)]
        parts = await self._fetch_group(ep, ref, digest, groups[0], counter, att)
        if len(groups) > 1:
            # After the first group: a server that answered it with the whole blob would
            # answer every other group with it again.
            whole = self._whole.get(digest)
            if whole is not None:
                return slice_ranges([(0, whole)], ranges)
            results = await asyncio.gather(
                *(self._fetch_group(ep, ref, digest, g, counter, att) for g in groups[1:])
            )
            parts += [p for r in results for p in r]
        return slice_ranges(parts, ranges)

    async def _fetch_group(
        self,
        ep: Endpoint,
        ref: Reference,
        digest: str,
        group: list[tuple[int, int]],
        counter: ByteCounter | None,
        att: Attempt,
    ) -> list[tuple[int, bytes]]:
        what = f"blob {digest}"

        async def handler(resp: aiohttp.ClientResponse) -> list[tuple[int, bytes]]:
            if resp.status == 206:
                body = await self.transport.read_body(resp, counter, None, ref, ep)
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
                # The server ignored Range: the whole blob is the answer (a pull-through
                # cache does this until it has the blob). Take the ranges from it and keep
                # it for the next reads of this blob (alsd.registry.wholeblobs).
                body = await self.transport.read_body(resp, counter, None, ref, ep)
                if self._whole.put(digest, body):
                    log.info(
                        "%s answered a range request for %s with the whole blob (%d bytes): "
                        "reads of it are served from that copy for %gs",
                        ep.host, digest, len(body), self._whole.keep_s,
                    )  # fmt: skip
                return [(0, body)]
            if resp.status == 400 and len(group) > 1:
                await self.transport.drain(resp, counter)
                raise _SwitchToSingleRange
            await self.transport.raise_status(resp, ref, ep, what, counter)

        try:
            return await self.transport.call_hedged(
                ep,
                ref,
                ep.url("blobs", digest),
                handler,
                counter,
                att,
                expect_bytes=sum(end - start for start, end in group),
                headers={"Range": range_header(group), "Accept-Encoding": "identity"},
                redirect_key=digest,
            )
        except _SwitchToSingleRange:
            log.info("%s answered 400 to a multi-range request: single ranges from now", ep.host)
            self.transport.set_single_range(ep.host)
            return await self._fetch_group(
                ep, ref, digest, [(group[0][0], group[-1][1])], counter, att
            )


def _as_ref(ref: Reference | str) -> Reference:
    return parse_reference(ref) if isinstance(ref, str) else ref
