"""Push blobs, manifests and indexes to a registry (OCI distribution spec, push side).

Used by ``alsd convert``. Every request goes through the client's
:class:`~alsd.registry.transport.Transport`, so pushes share the client's authentication
(Bearer tokens are asked for with ``repository:NAME:push,pull``), redirect rules,
retries, deadline and error mapping.
Pushes always go to the registry itself (after registries.conf ``location`` rewriting),
never to a mirror.

Blob upload, in order of preference (spec.md §5.1, distribution's ``docs/spec/api.md``):

1. ``HEAD /v2/NAME/blobs/DIGEST``: the blob is already there, nothing to send;
2. cross-repository mount ``POST /v2/NAME/blobs/uploads/?mount=DIGEST&from=REPO`` when a
   repository on the same registry holds it (201); a registry that cannot mount answers
   202 with an upload session instead, which is then used for 3 or 4;
3. monolithic: ``POST`` opens a session, ``PUT LOCATION?digest=DIGEST`` sends the body;
4. chunked, for blobs larger than ``chunk_threshold``: ``PATCH LOCATION`` with
   ``Content-Range: START-END`` per chunk (each answer gives the next ``Location``), then
   an empty ``PUT LOCATION?digest=DIGEST``. A chunk the registry rejects with 416 after a
   retry (it got part of an earlier attempt) is resumed from the offset the upload
   status (``GET LOCATION``, ``Range: 0-N``) reports.

Concurrency: a :class:`Pusher` holds no mutable state; any number of pushes may run
concurrently on one event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NoReturn, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from alsd.counters import ByteCounter
from alsd.errors import IntegrityError, NotFound, RegistryError
from alsd.oci.auth import repository_scope
from alsd.oci.manifest import ACCEPT_MANIFESTS, sha256_digest
from alsd.oci.reference import Reference
from alsd.registry.client import RegistryClient
from alsd.registry.regconf import Endpoint
from alsd.registry.transport import Handler

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CHUNK_THRESHOLD = 32 << 20
DEFAULT_UPLOAD_CHUNK = 16 << 20
_MAX_RESUMES = 5


class BlobPush(StrEnum):
    """How a blob got to the destination."""

    EXISTS = "exists"
    MOUNTED = "mounted"
    UPLOADED = "uploaded"


@dataclass(frozen=True, slots=True)
class PulledManifest:
    """A manifest or index exactly as the registry served it."""

    body: bytes
    content_type: str | None
    digest: str


class _Resume(Exception):
    """A PATCH was answered 416: ask the upload session where it stands."""


class Pusher:
    """Push side of the registry protocol on top of a :class:`RegistryClient`."""

    def __init__(
        self,
        client: RegistryClient,
        *,
        chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD,
        upload_chunk: int = DEFAULT_UPLOAD_CHUNK,
        counter: ByteCounter | None = None,
    ) -> None:
        if upload_chunk <= 0:
            raise ValueError("upload_chunk must be > 0")
        self.client = client
        self.chunk_threshold = chunk_threshold
        self.upload_chunk = upload_chunk
        self.counter = counter

    # ------------------------------------------------------------ helpers

    def endpoint(self, ref: Reference) -> Endpoint:
        """Where ``ref`` is pushed: the registry itself, never one of its mirrors."""
        return self.client.registries.endpoints(ref)[-1]

    def _scopes(self, ep: Endpoint, *pull_from: str) -> list[str]:
        scopes = [repository_scope(ep.repository, ("push", "pull"))]
        scopes += [repository_scope(r) for r in pull_from if r != ep.repository]
        return scopes

    async def _fail(
        self, resp: aiohttp.ClientResponse, ref: Reference, ep: Endpoint, what: str
    ) -> NoReturn:
        """Raise the client's error for an answer a handler does not accept."""
        await self.client.transport.raise_status(resp, ref, ep, what, self.counter)

    async def _request(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        url: str,
        handler: Handler[T],
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        scopes: Sequence[str] = (),
        counter: ByteCounter | None = None,
    ) -> T:
        """One request through the client's transport (auth, redirects, retries, deadline).

        ``scopes`` are token scopes (default: pull ``ep.repository``). ``data`` is resent on
        a retry, so only idempotent requests (or ones whose handler copes) go this way.
        """
        transport = self.client.transport
        return await transport.call(
            ep, ref, method, url, handler, counter, transport.attempt(),
            headers=headers, data=data, scope=" ".join(scopes) or None,
        )  # fmt: skip

    @staticmethod
    def _location(resp: aiohttp.ClientResponse, what: str, ref: Reference) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(
                f"{ref}: {what} on {resp.url.host}: HTTP {resp.status} without a Location"
            )
        # Relative Locations are relative to the request URL (RFC 7231 §7.1.2).
        return str(resp.url.join(URL(loc, encoded=True)))

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        # Appended by hand: the session's own query (distribution's _state) must be kept
        # byte for byte, and yarl's update_query would re-encode it.
        return f"{location}{'&' if '?' in location else '?'}digest={quote(digest, safe=':')}"

    # ------------------------------------------------------------ pull side the converter needs

    async def get_manifest(self, ref: Reference, obj: str | None = None) -> PulledManifest:
        """The raw manifest or index ``obj`` (default: the reference's tag or digest).

        Unlike :meth:`RegistryClient.resolve` this does not pick a platform, so an index
        comes back as an index. Verified against a digest reference, and against the
        ``Docker-Content-Digest`` header when the registry sends one.
        """
        ep = self.endpoint(ref)
        target = obj or ref.object
        limit = self.client.settings.max_manifest_bytes
        what = f"manifest {target}"

        async def handler(resp: aiohttp.ClientResponse) -> PulledManifest:
            if resp.status != 200:
                await self._fail(resp, ref, ep, what)
            body = await self.client.transport.read_body(resp, self.counter, limit, ref, ep)
            digest = sha256_digest(body)
            header = resp.headers.get("Docker-Content-Digest")
            if header and header.startswith("sha256:") and header != digest:
                raise IntegrityError(
                    f"{ref}: {what} on {ep.host}: Docker-Content-Digest says {header}, "
                    f"content is {digest}"
                )
            return PulledManifest(body, resp.headers.get("Content-Type"), digest)

        got = await self._request(
            ep,
            ref,
            "GET",
            ep.url("manifests", target),
            handler,
            headers={"Accept": ACCEPT_MANIFESTS},
            counter=self.counter,
        )
        if target.startswith("sha256:") and got.digest != target:
            raise IntegrityError(f"{ref}: {what} on {ep.host}: content has digest {got.digest}")
        return got

    # ------------------------------------------------------------ blobs

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        """HEAD the blob in ``ref``'s repository (with push scope: the caller will push)."""
        ep = self.endpoint(ref)

        async def handler(resp: aiohttp.ClientResponse) -> bool:
            if resp.status == 200:
                return True
            if resp.status == 404:
                return False
            await self._fail(resp, ref, ep, f"blob {digest}")

        return await self._request(
            ep,
            ref,
            "HEAD",
            ep.url("blobs", digest),
            handler,
            scopes=self._scopes(ep),
            counter=self.counter,
        )

    async def push_blob(
        self,
        ref: Reference,
        digest: str,
        data: bytes,
        *,
        mount_from: Sequence[str] = (),
    ) -> BlobPush:
        """Make blob ``digest`` (= ``data``) exist in ``ref``'s repository.

        ``mount_from`` names repositories on the same registry that may hold the blob;
        they are tried for a cross-repository mount before uploading.
        """
        algo, _, _ = digest.partition(":")
        if f"{algo}:{hashlib.new(algo, data).hexdigest()}" != digest:
            raise IntegrityError(f"{ref}: blob to push does not have digest {digest}")
        if await self.blob_exists(ref, digest):
            return BlobPush.EXISTS
        location: str | None = None
        for repo in mount_from:
            mounted, location = await self.mount(ref, digest, repo)
            if mounted:
                return BlobPush.MOUNTED
            if location is not None:
                break  # the registry opened an ordinary upload session instead
        if location is None:
            location = await self._start_upload(ref)
        if len(data) > self.chunk_threshold:
            await self._upload_chunked(ref, location, digest, data)
        else:
            await self._finish_upload(ref, location, digest, data)
        return BlobPush.UPLOADED

    async def mount(self, ref: Reference, digest: str, repo: str) -> tuple[bool, str | None]:
        """Cross-repository mount of ``digest`` from ``repo`` (same registry) into ``ref``.

        (True, None) if mounted; (False, session URL) if the registry opened an ordinary
        upload session instead (an unused session simply expires on the registry).
        """
        ep = self.endpoint(ref)
        if repo == ep.repository:
            return False, None
        url = (
            ep.url("blobs", "uploads/")
            + f"?mount={quote(digest, safe=':')}&from={quote(repo, safe='/')}"
        )
        what = f"mount of blob {digest} from {repo}"

        async def handler(resp: aiohttp.ClientResponse) -> tuple[bool, str | None]:
            if resp.status == 201:
                return True, None
            if resp.status == 202:
                return False, self._location(resp, what, ref)
            await self._fail(resp, ref, ep, what)

        return await self._request(
            ep,
            ref,
            "POST",
            url,
            handler,
            data=b"",
            scopes=self._scopes(ep, repo),
            counter=self.counter,
        )

    async def _start_upload(self, ref: Reference) -> str:
        ep = self.endpoint(ref)
        what = "blob upload"

        async def handler(resp: aiohttp.ClientResponse) -> str:
            if resp.status == 202:
                return self._location(resp, what, ref)
            await self._fail(resp, ref, ep, what)

        return await self._request(
            ep,
            ref,
            "POST",
            ep.url("blobs", "uploads/"),
            handler,
            data=b"",
            scopes=self._scopes(ep),
            counter=self.counter,
        )

    async def _finish_upload(self, ref: Reference, location: str, digest: str, data: bytes) -> None:
        """PUT LOCATION?digest= with the (rest of the) body; 201 completes the blob."""
        ep = self.endpoint(ref)
        what = f"upload of blob {digest}"

        async def handler(resp: aiohttp.ClientResponse) -> None:
            if resp.status in (201, 204):
                return
            await self._fail(resp, ref, ep, what)

        try:
            await self._request(
                ep,
                ref,
                "PUT",
                self._with_digest(location, digest),
                handler,
                headers={"Content-Type": "application/octet-stream"},
                data=data,
                scopes=self._scopes(ep),
                counter=self.counter,
            )
        except (NotFound, RegistryError):
            # A retried PUT finds its session gone when the first attempt completed the
            # upload but its answer was lost: the blob being there is success.
            if await self.blob_exists(ref, digest):
                return
            raise

    async def _upload_chunked(
        self, ref: Reference, location: str, digest: str, data: bytes
    ) -> None:
        ep = self.endpoint(ref)
        offset = 0
        resumes = 0
        while offset < len(data):
            end = min(offset + self.upload_chunk, len(data))
            try:
                location = await self._patch(ref, ep, location, data, offset, end)
            except _Resume:
                resumes += 1
                if resumes > _MAX_RESUMES:
                    raise RegistryError(
                        f"{ref}: chunked upload of {digest} to {ep.host} keeps being refused "
                        "(416) after resuming"
                    ) from None
                location, offset = await self._upload_status(ref, ep, location)
                log.info("%s: resuming upload of %s at %d", ref, digest, offset)
                continue
            offset = end
            # Yield between chunks so that parallel layer pushes interleave.
            await asyncio.sleep(0)
        await self._finish_upload(ref, location, digest, b"")

    async def _patch(
        self, ref: Reference, ep: Endpoint, location: str, data: bytes, start: int, end: int
    ) -> str:
        what = f"upload chunk {start}-{end - 1}"

        async def handler(resp: aiohttp.ClientResponse) -> str:
            if resp.status == 202:
                return self._location(resp, what, ref)
            if resp.status == 416:
                raise _Resume
            await self._fail(resp, ref, ep, what)

        return await self._request(
            ep,
            ref,
            "PATCH",
            location,
            handler,
            headers={
                "Content-Type": "application/octet-stream",
                # distribution wants "START-END" (inclusive), without a "bytes=" unit.
                "Content-Range": f"{start}-{end - 1}",
            },
            data=data[start:end],
            scopes=self._scopes(ep),
            counter=self.counter,
        )

    async def _upload_status(self, ref: Reference, ep: Endpoint, location: str) -> tuple[str, int]:
        """(location, next offset) of an upload session (``Range: 0-N`` → N + 1)."""
        what = "upload status"

        async def handler(resp: aiohttp.ClientResponse) -> tuple[str, int]:
            if resp.status == 204:
                rng = resp.headers.get("Range", "")
                _, _, last = rng.removeprefix("bytes=").partition("-")
                try:
                    nxt = int(last) + 1 if last else 0
                except ValueError:
                    raise RegistryError(f"{ref}: {what} on {ep.host}: bad Range {rng!r}") from None
                loc = self._location(resp, what, ref) if "Location" in resp.headers else location
                return loc, nxt
            await self._fail(resp, ref, ep, what)

        return await self._request(
            ep, ref, "GET", location, handler, scopes=self._scopes(ep), counter=self.counter
        )

    # ------------------------------------------------------------ manifests

    async def push_manifest(
        self, ref: Reference, body: bytes, media_type: str, tag: str | None = None
    ) -> str:
        """PUT a manifest or index under ``tag`` (default: the reference's tag, else its
        digest); returns its digest. Every blob it names must already be pushed."""
        ep = self.endpoint(ref)
        digest = sha256_digest(body)
        target = tag or ref.tag or ref.digest or "latest"
        if ref.digest is not None and tag is None and ref.digest != digest:
            raise IntegrityError(f"{ref}: manifest to push has digest {digest}")
        what = f"manifest {target}"

        async def handler(resp: aiohttp.ClientResponse) -> None:
            if resp.status in (200, 201, 202):
                header = resp.headers.get("Docker-Content-Digest")
                if header and header.startswith("sha256:") and header != digest:
                    raise IntegrityError(
                        f"{ref}: {ep.host} stored {what} as {header}, pushed {digest}"
                    )
                return
            await self._fail(resp, ref, ep, what)

        await self._request(
            ep,
            ref,
            "PUT",
            ep.url("manifests", target),
            handler,
            headers={"Content-Type": media_type},
            data=body,
            scopes=self._scopes(ep),
            counter=self.counter,
        )
        return digest

    async def push_index(self, ref: Reference, body: bytes, media_type: str) -> str:
        """PUT an index (or Docker manifest list); the same request as a manifest PUT."""
        return await self.push_manifest(ref, body, media_type)
