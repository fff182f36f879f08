"""Pusher against the real docker-registry: monolithic, chunked and mounted blob uploads,
manifest and index PUTs, anonymous and with htpasswd / bearer-token authentication."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alsd.config import RegistrySettings
from alsd.errors import IntegrityError, Unauthorized
from alsd.oci.manifest import OCI_INDEX, Platform
from alsd.oci.reference import Reference, parse_reference
from alsd.registry.authfile import CredentialStore
from alsd.registry.client import RegistryClient
from alsd.registry.push import BlobPush, Pusher
from alsd.registry.regconf import parse_registries_conf_text
from tests.support.faultproxy import FaultProxy
from tests.support.registry import RegistryServer, fixture_blob_path, fixture_manifest

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry


def client(server: RegistryServer, creds: CredentialStore | None = None) -> RegistryClient:
    conf = parse_registries_conf_text(
        f'[[registry]]\nlocation = "{server.address}"\ninsecure = true\n'
    )
    return RegistryClient(
        RegistrySettings(max_retries=1, backoff_min_s=0.01, deadline_s=60),
        registries=conf,
        credentials=creds,
        platform=Platform("linux", "amd64"),
    )


def ref(server: RegistryServer, repo: str, tag: str = "t") -> Reference:
    return parse_reference(f"{server.address}/{repo}:{tag}")


def blob(n: int) -> tuple[str, bytes]:
    import hashlib

    data = os.urandom(n)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


async def read_back(c: RegistryClient, r: Reference, digest: str) -> bytes:
    return b"".join([part async for part in c.read_blob(r, digest)])


async def test_monolithic_upload_then_exists(registry: RegistryServer) -> None:
    digest, data = blob(5000)
    r = ref(registry, "push/mono")
    async with client(registry) as c:
        p = Pusher(c)
        assert not await p.blob_exists(r, digest)
        assert await p.push_blob(r, digest, data) is BlobPush.UPLOADED
        assert await p.blob_exists(r, digest)
        assert await p.push_blob(r, digest, data) is BlobPush.EXISTS
        assert await read_back(c, r, digest) == data


async def test_chunked_upload(registry: RegistryServer) -> None:
    # Not a multiple of the chunk size: the last PATCH is short.
    digest, data = blob(3 * 4096 + 123)
    r = ref(registry, "push/chunked")
    async with client(registry) as c:
        p = Pusher(c, chunk_threshold=1000, upload_chunk=4096)
        assert await p.push_blob(r, digest, data) is BlobPush.UPLOADED
        assert await read_back(c, r, digest) == data


async def test_wrong_digest_is_refused_before_sending(registry: RegistryServer) -> None:
    digest, _ = blob(10)
    async with client(registry) as c:
        with pytest.raises(IntegrityError):
            await Pusher(c).push_blob(ref(registry, "push/bad"), digest, b"other bytes")


async def test_cross_repository_mount(registry: RegistryServer) -> None:
    digest, data = blob(7000)
    src, dst = ref(registry, "push/mount-src"), ref(registry, "push/mount-dst")
    async with client(registry) as c:
        p = Pusher(c)
        assert await p.push_blob(src, digest, data) is BlobPush.UPLOADED
        assert await p.push_blob(dst, digest, data, mount_from=["push/mount-src"]) is (
            BlobPush.MOUNTED
        )
        assert await read_back(c, dst, digest) == data
        # A source that does not hold the blob: the registry opens an upload instead.
        d2, data2 = blob(300)
        assert await p.push_blob(dst, d2, data2, mount_from=["push/mount-src"]) is (
            BlobPush.UPLOADED
        )
        assert await read_back(c, dst, d2) == data2


async def push_fixture_image(p: Pusher, r: Reference, tag: str) -> str:
    """Push the fixture tag's blobs and manifest by hand; returns the manifest digest."""
    _, body = fixture_manifest(tag)
    doc = json.loads(body)
    for desc in [doc["config"], *doc["layers"]]:
        await p.push_blob(r, desc["digest"], fixture_blob_path(desc["digest"]).read_bytes())
    return await p.push_manifest(r, body, doc["mediaType"])


async def test_manifest_and_index_put(registry: RegistryServer, fixtures: object) -> None:
    r = ref(registry, "push/image", "gz")
    async with client(registry) as c:
        p = Pusher(c)
        digest = await push_fixture_image(p, r, "gzip")
        want, body = fixture_manifest("gzip")
        assert digest == want
        img = await c.resolve(r)
        assert img.manifest_digest == want and img.manifest_bytes == body

        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": json.loads(body)["mediaType"],
                        "digest": digest,
                        "size": len(body),
                        "platform": {"os": "linux", "architecture": "amd64"},
                    }
                ],
            }
        ).encode()
        ri = ref(registry, "push/image", "multi")
        index_digest = await p.push_index(ri, index, OCI_INDEX)
        got = await p.get_manifest(ri)
        assert got.body == index and got.digest == index_digest
        img = await c.resolve(ri)
        assert img.index_digest == index_digest and img.manifest_digest == want


async def test_manifest_put_needs_its_blobs(registry: RegistryServer, fixtures: object) -> None:
    _, body = fixture_manifest("esgz")
    async with client(registry) as c:
        with pytest.raises(Exception) as exc:
            await Pusher(c).push_manifest(
                ref(registry, "push/missing"), body, json.loads(body)["mediaType"]
            )
    # distribution names the missing blob: the message carries the registry's detail.
    assert "MANIFEST_BLOB_UNKNOWN" in str(exc.value) and registry.address in str(exc.value)


async def test_push_with_htpasswd(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    creds = CredentialStore([registry_htpasswd.write_auth_json(tmp_path / "auth.json")])
    r = ref(registry_htpasswd, "push/auth", "gz")
    async with client(registry_htpasswd, creds) as c:
        p = Pusher(c)
        assert await push_fixture_image(p, r, "gzip") == fixture_manifest("gzip")[0]
        d, data = blob(20000)
        assert await Pusher(c, chunk_threshold=1, upload_chunk=8192).push_blob(r, d, data) is (
            BlobPush.UPLOADED
        )
        assert await read_back(c, r, d) == data


async def test_push_without_credentials_is_unauthorized(
    registry_htpasswd: RegistryServer, tmp_path: Path
) -> None:
    (tmp_path / "auth.json").write_text('{"auths": {}}')
    d, data = blob(100)
    async with client(registry_htpasswd, CredentialStore([tmp_path / "auth.json"])) as c:
        with pytest.raises(Unauthorized) as exc:
            await Pusher(c).push_blob(ref(registry_htpasswd, "push/anon"), d, data)
    assert registry_htpasswd.address in str(exc.value)


async def test_push_with_bearer_token_scopes(
    registry_token: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    creds = CredentialStore([registry_token.write_auth_json(tmp_path / "auth.json")])
    src, dst = ref(registry_token, "push/tok-src"), ref(registry_token, "push/tok-dst")
    d, data = blob(4000)
    assert registry_token.token_server is not None
    async with client(registry_token, creds) as c:
        p = Pusher(c)
        assert await p.push_blob(src, d, data) is BlobPush.UPLOADED
        assert await p.push_blob(dst, d, data, mount_from=["push/tok-src"]) is BlobPush.MOUNTED
    scopes = {s for req in registry_token.token_server.requests for s in req["scopes"]}
    assert "repository:push/tok-src:push,pull" in scopes
    # The mount asked for pull on the source in the same token as push on the target.
    assert {"repository:push/tok-dst:push,pull", "repository:push/tok-src:pull"} <= scopes


async def test_anonymous_push_with_pull_only_token_is_unauthorized(
    registry_token: RegistryServer, tmp_path: Path
) -> None:
    (tmp_path / "auth.json").write_text('{"auths": {}}')
    d, data = blob(100)
    async with client(registry_token, CredentialStore([tmp_path / "auth.json"])) as c:
        with pytest.raises(Unauthorized) as exc:
            await Pusher(c).push_blob(ref(registry_token, "push/anon"), d, data)
    assert registry_token.address in str(exc.value)


def proxied_client(proxy: FaultProxy) -> RegistryClient:
    # The registry builds upload Locations from the Host it sees; the proxy forwards with
    # its upstream's Host, so tell the registry where the client really is, or the
    # PATCH/PUT requests would bypass the proxy.
    proxy.inject_headers["X-Forwarded-Host"] = proxy.address
    conf = parse_registries_conf_text(
        f'[[registry]]\nlocation = "{proxy.address}"\ninsecure = true\n'
    )
    return RegistryClient(
        RegistrySettings(max_retries=3, backoff_min_s=0.01, deadline_s=60),
        registries=conf,
        platform=Platform("linux", "amd64"),
    )


async def test_chunk_retried_after_500(registry: RegistryServer) -> None:
    digest, data = blob(3 * 4096)
    async with FaultProxy(registry.url) as proxy:
        proxy.fail(r"/blobs/uploads/", status=500, method="PATCH", times=1)
        r = parse_reference(f"{proxy.address}/push/fault500:t")
        async with proxied_client(proxy) as c:
            p = Pusher(c, chunk_threshold=1, upload_chunk=4096)
            assert await p.push_blob(r, digest, data) is BlobPush.UPLOADED
            assert await read_back(c, r, digest) == data
        patches = [x for x in proxy.requests if x.method == "PATCH"]
        assert [x.rule for x in patches].count("status") == 1 and len(patches) == 4


async def test_chunk_answer_lost_still_gives_the_right_blob(registry: RegistryServer) -> None:
    # The registry stores the chunk, then the connection breaks before the answer, and the
    # chunk is sent again. distribution 2.8 takes the resend on the session's recorded
    # state (newer registries answer 416, and the pusher then resumes from the upload
    # status); either way the blob must end up exactly right.
    digest, data = blob(3 * 4096 + 7)
    async with FaultProxy(registry.url) as proxy:
        r = parse_reference(f"{proxy.address}/push/faultreset:t")
        async with proxied_client(proxy) as c:
            p = Pusher(c, chunk_threshold=1, upload_chunk=4096)
            location = await p._start_upload(r)
            proxy.reset_body(r"/blobs/uploads/", method="PATCH", times=1)
            # Drive the chunked upload on that session (what push_blob does after POST).
            await p._upload_chunked(r, location, digest, data)
            assert await read_back(c, r, digest) == data
        kinds = [(x.method, x.rule) for x in proxy.requests if "/blobs/uploads/" in x.path]
        assert ("PATCH", "reset") in kinds


async def test_final_put_retried_after_502(registry: RegistryServer) -> None:
    digest, data = blob(2000)
    async with FaultProxy(registry.url) as proxy:
        proxy.fail(r"/blobs/uploads/.*digest=", status=502, method="PUT", times=1)
        r = parse_reference(f"{proxy.address}/push/faultput:t")
        async with proxied_client(proxy) as c:
            assert await Pusher(c).push_blob(r, digest, data) is BlobPush.UPLOADED
            assert await read_back(c, r, digest) == data
        puts = [x.rule for x in proxy.requests if x.method == "PUT"]
        assert puts == ["status", None]  # the body was sent again, whole
