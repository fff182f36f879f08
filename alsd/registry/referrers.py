"""Find and attach prefetch-profile artifacts in a registry (OCI distribution 1.1).

Lookup (:meth:`ProfileRegistry.find_profile`), in the order the distribution spec gives:

1. the referrers API, ``GET /v2/NAME/referrers/DIGEST?artifactType=TYPE``: an image index
   of the manifests whose ``subject`` is ``DIGEST``. A registry that has the API answers
   200 with an index (empty when nothing refers to the image); a 404, or an answer that
   is not an image index, means it has none (Debian's docker-registry 2.8 answers 404);
2. else the referrers tag schema: the tag ``sha256-<hex of DIGEST>`` holds an image index
   of the referrers, kept up to date by the clients that push them. No tag (404): no
   profile.

Of the profile artifacts listed, the newest (``org.opencontainers.image.created``) whose
manifest and blob pass the checks of :mod:`alsd.oci.profile` is used.

Push (:func:`push_profile`): the empty config blob and the profile blob, then the
artifact manifest by digest. A registry with the referrers API confirms the ``subject``
with an ``OCI-Subject`` header on that PUT; without it, the tag-schema index is read,
the new descriptor added to it (everything else in it kept) and the index PUT back.

Lookups and pushes go to the registry itself (after registries.conf rewriting), not to
mirrors: mirrors serve what was pulled through them, which does not include referrers.
Knows nothing of FUSE; every request goes through the client's transport. The protocol
facts are in developer-notes/profiles.md ("The artifact and the referrers").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from alsd.counters import ByteCounter
from alsd.errors import AlsdError, FormatError, NotFound, RegistryError
from alsd.oci.auth import repository_scope
from alsd.oci.manifest import ACCEPT_MANIFESTS, OCI_INDEX, OCI_MANIFEST, sha256_digest
from alsd.oci.profile import (
    ANNOTATION_CREATED,
    ARTIFACT_TYPE,
    DEFAULT_LIMITS,
    EMPTY_BLOB,
    EMPTY_DIGEST,
    Profile,
    ProfileLimits,
    Referrer,
    add_referrer,
    artifact_manifest,
    parse_artifact_manifest,
    parse_profile,
    parse_referrers,
    profile_referrers,
    referrer_descriptor,
    referrers_tag,
)
from alsd.oci.reference import Reference
from alsd.registry.client import RegistryClient
from alsd.registry.push import Pusher
from alsd.registry.regconf import Endpoint

log = logging.getLogger(__name__)

#: Largest referrers index read (API answer or tag-schema tag).
MAX_REFERRERS_BYTES = 4 << 20
#: Largest artifact manifest read.
MAX_ARTIFACT_MANIFEST_BYTES = 64 << 10
#: How many profile artifacts are tried, newest first, before giving up.
MAX_CANDIDATES = 4

VIA_API = "referrers API"
VIA_TAG = "referrers tag schema"


@dataclass(frozen=True, slots=True)
class FoundProfile:
    profile: Profile
    artifact_digest: str
    via: str  # VIA_API or VIA_TAG


@dataclass(frozen=True, slots=True)
class PushedProfile:
    artifact_digest: str
    via: str  # VIA_API when the registry confirmed the subject, else VIA_TAG


async def _read_limited(
    resp: aiohttp.ClientResponse, limit: int, what: str, counter: ByteCounter | None
) -> bytes:
    buf = bytearray()
    async for chunk in resp.content.iter_any():
        if counter is not None:
            counter.add(len(chunk))
        buf += chunk
        if len(buf) > limit:
            resp.close()
            raise FormatError(f"{what}: answer exceeds {limit} bytes")
    return bytes(buf)


class ProfileRegistry:
    """Profile lookups for one :class:`RegistryClient`."""

    def __init__(
        self,
        client: RegistryClient,
        *,
        limits: ProfileLimits = DEFAULT_LIMITS,
        counter: ByteCounter | None = None,
    ) -> None:
        self.client = client
        self.limits = limits
        self.counter = counter

    def endpoint(self, ref: Reference) -> Endpoint:
        return self.client.registries.endpoints(ref)[-1]

    async def _get(
        self, ref: Reference, ep: Endpoint, url: str, accept: str, limit: int, what: str
    ) -> tuple[int, bytes, str | None]:
        """(status, body, Content-Type) for 200 and 404; other statuses raise."""

        async def handler(resp: aiohttp.ClientResponse) -> tuple[int, bytes, str | None]:
            if resp.status == 404:
                return 404, b"", None
            if resp.status != 200:
                await self.client.transport.raise_status(resp, ref, ep, what, self.counter)
            body = await _read_limited(resp, limit, f"{ref}: {what} on {ep.host}", self.counter)
            return 200, body, resp.headers.get("Content-Type")

        transport = self.client.transport
        return await transport.call(
            ep, ref, "GET", url, handler, self.counter, transport.attempt(),
            headers={"Accept": accept},
        )  # fmt: skip

    async def referrers_api(self, ref: Reference, digest: str) -> list[Referrer] | None:
        """The referrers API's profile entries for ``digest``; None when there is no API."""
        ep = self.endpoint(ref)
        url = f"{ep.url('referrers', digest)}?artifactType={quote(ARTIFACT_TYPE, safe='')}"
        status, body, _ = await self._get(
            ref, ep, url, OCI_INDEX, MAX_REFERRERS_BYTES, f"referrers of {digest}"
        )
        if status == 404:
            return None
        try:
            return parse_referrers(body, max_bytes=MAX_REFERRERS_BYTES)
        except FormatError as exc:
            log.debug("%s: referrers API answer is not an index (%s): no API", ref, exc)
            return None

    async def referrers_tag(self, ref: Reference, digest: str) -> list[Referrer]:
        """The entries of the referrers tag schema's index for ``digest`` (none: [])."""
        tag = referrers_tag(digest)
        ep = self.endpoint(ref)
        status, body, _ = await self._get(
            ref, ep, ep.url("manifests", tag), ACCEPT_MANIFESTS, MAX_REFERRERS_BYTES,
            f"referrers tag {tag}",
        )  # fmt: skip
        if status == 404:
            return []
        try:
            return parse_referrers(body, max_bytes=MAX_REFERRERS_BYTES)
        except FormatError as exc:
            raise FormatError(f"{ref}: referrers tag {tag}: {exc}") from None

    async def referrers(self, ref: Reference, digest: str) -> tuple[list[Referrer], str]:
        """Referrers of ``digest`` through the API, else the tag schema; and which."""
        found = await self.referrers_api(ref, digest)
        if found is not None:
            return found, VIA_API
        return await self.referrers_tag(ref, digest), VIA_TAG

    async def fetch_profile(self, ref: Reference, image_digest: str, artifact: str) -> Profile:
        """The profile in artifact manifest ``artifact``; FormatError when it is not one."""
        ep = self.endpoint(ref)
        status, body, _ = await self._get(
            ref, ep, ep.url("manifests", artifact), OCI_MANIFEST, MAX_ARTIFACT_MANIFEST_BYTES,
            f"profile artifact {artifact}",
        )  # fmt: skip
        if status == 404:
            raise NotFound(f"{ref}: profile artifact {artifact} is listed but not there")
        if sha256_digest(body) != artifact:
            raise FormatError(f"{ref}: profile artifact {artifact}: content has another digest")
        desc = parse_artifact_manifest(body, image_digest, self.limits)
        blob = await self.client.fetch_blob(
            ref, desc.blob_digest, max_bytes=self.limits.max_bytes, counter=self.counter
        )
        return parse_profile(blob, self.limits)

    async def find_profile(self, ref: Reference, image_digest: str) -> FoundProfile | None:
        """The newest usable profile attached to image manifest ``image_digest``, or None.

        Raises :class:`FormatError` (or the registry's error) when profiles are listed but
        none of them can be used; the message names the first one's problem.
        """
        listed, via = await self.referrers(ref, image_digest)
        candidates = profile_referrers(listed)
        if not candidates:
            return None
        first: AlsdError | None = None
        for r in candidates[:MAX_CANDIDATES]:
            try:
                profile = await self.fetch_profile(ref, image_digest, r.digest)
            except (FormatError, RegistryError) as exc:
                log.debug("%s: profile artifact %s unusable: %s", ref, r.digest, exc)
                first = first or exc
                continue
            return FoundProfile(profile, r.digest, via)
        assert first is not None
        raise type(first)(f"profile artifact via the {via}: {first}")


async def push_profile(
    pusher: Pusher,
    ref: Reference,
    *,
    subject_media_type: str,
    subject_digest: str,
    subject_size: int,
    profile_blob: bytes,
    created: str,
) -> PushedProfile:
    """Attach ``profile_blob`` to image manifest ``subject_digest`` in ``ref``'s repository."""
    await pusher.push_blob(ref, EMPTY_DIGEST, EMPTY_BLOB)
    await pusher.push_blob(ref, sha256_digest(profile_blob), profile_blob)
    annotations = {ANNOTATION_CREATED: created}
    manifest = artifact_manifest(
        profile_blob, subject_media_type, subject_digest, subject_size, annotations=annotations
    )
    digest = sha256_digest(manifest)
    confirmed = await _put_manifest(pusher, ref, manifest, OCI_MANIFEST, digest)
    if confirmed == subject_digest:
        return PushedProfile(digest, VIA_API)
    # No referrers API: keep the tag schema's index up to date ourselves.
    tag = referrers_tag(subject_digest)
    current: bytes | None
    try:
        current = (await pusher.get_manifest(ref, tag)).body
    except NotFound:
        current = None
    index = add_referrer(current, referrer_descriptor(manifest, annotations=annotations))
    await _put_manifest(pusher, ref, index, OCI_INDEX, tag)
    return PushedProfile(digest, VIA_TAG)


async def _put_manifest(
    pusher: Pusher, ref: Reference, body: bytes, media_type: str, target: str
) -> str | None:
    """PUT ``body`` at ``manifests/target``; the ``OCI-Subject`` header of the answer."""
    client = pusher.client
    ep = pusher.endpoint(ref)
    digest = sha256_digest(body)
    what = f"manifest {target}"

    async def handler(resp: aiohttp.ClientResponse) -> str | None:
        if resp.status in (200, 201, 202):
            header = resp.headers.get("Docker-Content-Digest")
            if header and header.startswith("sha256:") and header != digest:
                raise RegistryError(f"{ref}: {ep.host} stored {what} as {header}, pushed {digest}")
            return resp.headers.get("OCI-Subject")
        await client.transport.raise_status(resp, ref, ep, what, pusher.counter)

    transport = client.transport
    return await transport.call(
        ep, ref, "PUT", ep.url("manifests", target), handler, pusher.counter,
        transport.attempt(), headers={"Content-Type": media_type}, data=body,
        scope=repository_scope(ep.repository, ("push", "pull")),
    )  # fmt: skip
