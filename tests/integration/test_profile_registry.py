"""Profile artifacts in registries: push and find them through the referrers tag schema
(Debian's docker-registry 2.8, which has no referrers API) and through the referrers API
(a stand-in, see tests/support/referrers_registry.py); hostile artifacts are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from alsd.config import RegistrySettings
from alsd.errors import FormatError, RegistryError
from alsd.oci.manifest import OCI_INDEX, OCI_MANIFEST, Platform, sha256_digest
from alsd.oci.profile import (
    ANNOTATION_CREATED,
    ARTIFACT_TYPE,
    LayerProfile,
    Profile,
    ProfileEntry,
    ProfileLimits,
    artifact_manifest,
    referrers_tag,
    serialize_profile,
)
from alsd.oci.reference import Reference, parse_reference
from alsd.registry.client import RegistryClient
from alsd.registry.push import Pusher
from alsd.registry.referrers import VIA_API, VIA_TAG, ProfileRegistry, push_profile
from alsd.registry.regconf import parse_registries_conf_text
from tests.support.referrers_registry import ReferrersRegistry
from tests.support.registry import RegistryServer

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry

LAYER = "sha256:" + "a" * 64


def client(address: str) -> RegistryClient:
    conf = parse_registries_conf_text(f'[[registry]]\nlocation = "{address}"\ninsecure = true\n')
    return RegistryClient(
        RegistrySettings(max_retries=1, backoff_min_s=0.01, deadline_s=60),
        registries=conf,
        platform=Platform("linux", "amd64"),
    )


def profile(*paths: str) -> Profile:
    return Profile((LayerProfile(LAYER, tuple(ProfileEntry(p, 0, 10) for p in paths)),))


async def push(c: RegistryClient, ref: Reference, p: Profile | bytes, created: str) -> str:
    resolved = await c.resolve(ref)
    blob = p if isinstance(p, bytes) else serialize_profile(p)
    pushed = await push_profile(
        Pusher(c),
        ref,
        subject_media_type=resolved.manifest.media_type,
        subject_digest=resolved.manifest_digest,
        subject_size=len(resolved.manifest_bytes),
        profile_blob=blob,
        created=created,
    )
    return pushed.artifact_digest


async def test_tag_schema_on_the_real_registry(registry: RegistryServer) -> None:
    ref = parse_reference(registry.push_fixture("esgz", repo="profiles/tagschema"))
    async with client(registry.address) as c:
        image = (await c.resolve(ref)).manifest_digest
        reg = ProfileRegistry(c)
        # distribution 2.8 has no referrers API, and nothing is attached yet.
        assert await reg.referrers_api(ref, image) is None
        assert await reg.find_profile(ref, image) is None
        # Someone else's referrer (a signature, say) is already in the tag-schema index.
        p = Pusher(c)
        await p.push_blob(ref, sha256_digest(b"{}"), b"{}")
        await p.push_blob(ref, sha256_digest(b"sig"), b"sig")
        foreign = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.example.signature",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": sha256_digest(b"{}"),
                    "size": 2,
                },
                "layers": [
                    {
                        "mediaType": "application/octet-stream",
                        "digest": sha256_digest(b"sig"),
                        "size": 3,
                    }
                ],
            }
        ).encode()
        foreign_digest = await p.push_manifest(
            ref, foreign, OCI_MANIFEST, tag=sha256_digest(foreign)
        )
        foreign_entry = {
            "mediaType": OCI_MANIFEST,
            "digest": foreign_digest,
            "size": len(foreign),
            "artifactType": "application/vnd.example.signature",
        }
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [foreign_entry]}
        await p.push_manifest(ref, json.dumps(index).encode(), OCI_INDEX, tag=referrers_tag(image))

        first = await push(c, ref, profile("bin/sh"), "2026-12-01T00:00:00Z")
        found = await reg.find_profile(ref, image)
        assert found is not None
        assert (found.profile, found.artifact_digest, found.via) == (
            profile("bin/sh"),
            first,
            VIA_TAG,
        )

        second = await push(c, ref, profile("bin/sh", "etc/passwd"), "2026-12-02T00:00:00Z")
        found = await reg.find_profile(ref, image)
        assert found is not None and found.artifact_digest == second
        assert found.profile == profile("bin/sh", "etc/passwd")
        # The tag-schema index kept the other referrer and the older profile.
        tag_index = json.loads((await p.get_manifest(ref, referrers_tag(image))).body)
        assert tag_index["manifests"][0] == foreign_entry
        assert [m["digest"] for m in tag_index["manifests"]] == [foreign_digest, first, second]
        assert [m.get("artifactType") for m in tag_index["manifests"][1:]] == [ARTIFACT_TYPE] * 2
        # The artifact is a plain OCI image manifest with the image as its subject.
        art = json.loads((await p.get_manifest(ref, second)).body)
        assert art["subject"]["digest"] == image
        assert art["artifactType"] == ARTIFACT_TYPE
        assert art["annotations"] == {ANNOTATION_CREATED: "2026-12-02T00:00:00Z"}


@pytest.fixture
def referrers_registry() -> Iterator[ReferrersRegistry]:
    server = ReferrersRegistry()
    yield server
    server.stop()


def _image(server: ReferrersRegistry) -> tuple[Reference, str]:
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_digest(
                    b'{"rootfs":{"diff_ids":[]},"os":"linux","architecture":"amd64"}'
                ),
                "size": 54,
            },
            "layers": [],
        }
    ).encode()
    config = b'{"rootfs":{"diff_ids":[]},"os":"linux","architecture":"amd64"}'
    server.blobs[sha256_digest(config)] = config
    digest = server.put_image("app", "v1", manifest, OCI_MANIFEST)
    return parse_reference(f"{server.address}/app:v1"), digest


async def test_referrers_api_on_the_stand_in(referrers_registry: ReferrersRegistry) -> None:
    ref, image = _image(referrers_registry)
    async with client(referrers_registry.address) as c:
        reg = ProfileRegistry(c)
        assert await reg.referrers_api(ref, image) == []
        assert await reg.find_profile(ref, image) is None
        digest = await push(c, ref, profile("usr/bin/python3"), "2026-12-01T00:00:00Z")
        found = await reg.find_profile(ref, image)
        assert found is not None
        assert (found.profile, found.artifact_digest, found.via) == (
            profile("usr/bin/python3"),
            digest,
            VIA_API,
        )
    # The registry confirmed the subject, so no tag-schema index was written, and the
    # lookup asked the API with the artifact type filter, never for the tag.
    assert ("app", referrers_tag(image)) not in referrers_registry.tags
    tag_path = f"/v2/app/manifests/{referrers_tag(image)}"
    assert ("GET", tag_path) not in referrers_registry.requests
    assert ("GET", f"/v2/app/referrers/{image}") in referrers_registry.requests


async def test_stand_in_without_the_api_falls_back_to_the_tag(
    referrers_registry: ReferrersRegistry,
) -> None:
    referrers_registry.referrers_api = False
    ref, image = _image(referrers_registry)
    async with client(referrers_registry.address) as c:
        digest = await push(c, ref, profile("a"), "2026-12-01T00:00:00Z")
        found = await ProfileRegistry(c).find_profile(ref, image)
    assert found is not None and (found.artifact_digest, found.via) == (digest, VIA_TAG)
    assert ("app", referrers_tag(image)) in referrers_registry.tags


async def _attach_raw(
    c: RegistryClient, ref: Reference, image: str, manifest: bytes, blob: bytes
) -> None:
    """Attach an arbitrary artifact manifest through the tag schema (hostile publisher)."""
    p = Pusher(c)
    await p.push_blob(ref, sha256_digest(b"{}"), b"{}")
    await p.push_blob(ref, sha256_digest(blob), blob)
    digest = await p.push_manifest(ref, manifest, OCI_MANIFEST, tag=sha256_digest(manifest))
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(manifest),
        "artifactType": ARTIFACT_TYPE,
    }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    await p.push_manifest(ref, json.dumps(index).encode(), OCI_INDEX, tag=referrers_tag(image))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("huge", "exceeds"),
        ("wrong schema", "unknown field"),
        ("not json", "not JSON"),
        ("other subject", "subject"),
        ("lying size", "exceeds 65536 bytes"),
    ],
)
async def test_hostile_artifacts_are_refused(
    registry: RegistryServer, kind: str, message: str
) -> None:
    ref = parse_reference(
        registry.push_fixture("esgz", repo=f"profiles/hostile-{kind.replace(' ', '-')}")
    )
    limits = ProfileLimits(max_bytes=64 << 10)
    async with client(registry.address) as c:
        resolved = await c.resolve(ref)
        image = resolved.manifest_digest
        subject = (resolved.manifest.media_type, image, len(resolved.manifest_bytes))
        if kind == "huge":
            blob = serialize_profile(profile(*(f"f{i:06d}" for i in range(4000))))
            assert len(blob) > limits.max_bytes
            manifest = artifact_manifest(blob, *subject)
        elif kind == "wrong schema":
            blob = json.dumps({"mediaType": "application/json", "files": ["bin/sh"]}).encode()
            manifest = artifact_manifest(blob, *subject)
        elif kind == "not json":
            blob = b"\x00" * 100
            manifest = artifact_manifest(blob, *subject)
        elif kind == "other subject":
            blob = serialize_profile(profile("bin/sh"))
            manifest = artifact_manifest(blob, OCI_MANIFEST, "sha256:" + "e" * 64, 10)
        else:  # the manifest says the blob is small, the blob is huge
            blob = serialize_profile(profile(*(f"f{i:06d}" for i in range(4000))))
            doc = json.loads(artifact_manifest(blob, *subject))
            doc["layers"][0]["size"] = 100
            manifest = json.dumps(doc).encode()
        await _attach_raw(c, ref, image, manifest, blob)
        # A blob larger than its descriptor says is cut off by the client's size bound.
        error = RegistryError if kind == "lying size" else FormatError
        with pytest.raises(error, match=message):
            await ProfileRegistry(c, limits=limits).find_profile(ref, image)
