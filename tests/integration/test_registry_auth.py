"""Authentication against the real docker-registry: htpasswd Basic, and Bearer tokens
from a token server the tests run (distribution's ``auth.token``)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from alsd.config import RegistrySettings
from alsd.errors import ConfigError, Unauthorized
from alsd.oci.manifest import Platform
from alsd.registry.authfile import CredentialStore, HelperCredentials
from alsd.registry.client import RegistryClient
from alsd.registry.regconf import parse_registries_conf_text
from tests.support.registry import (
    RegistryServer,
    fixture_blob_path,
    fixture_manifest,
    running_registry,
)

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry


def client(server: RegistryServer, creds: CredentialStore | None) -> RegistryClient:
    conf = parse_registries_conf_text(
        f'[[registry]]\nlocation = "{server.address}"\ninsecure = true\n'
    )
    return RegistryClient(
        RegistrySettings(max_retries=1, backoff_min_s=0.01),
        registries=conf,
        credentials=creds,
        platform=Platform("linux", "amd64"),
    )


async def test_basic_auth_with_auth_json(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    ref = registry_htpasswd.push_fixture("esgz")
    creds = CredentialStore([registry_htpasswd.write_auth_json(tmp_path / "auth.json")])
    async with client(registry_htpasswd, creds) as c:
        img = await c.resolve(ref)
        assert img.manifest_digest == fixture_manifest("esgz")[0]
        layer = img.manifest.layers[1]
        local = fixture_blob_path(layer.digest).read_bytes()
        assert await c.read_ranges(ref, layer.digest, [(0, 100), (200, 300)]) == [
            local[:100],
            local[200:300],
        ]


async def test_basic_auth_without_credentials(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    ref = registry_htpasswd.push_fixture("esgz")
    (tmp_path / "auth.json").write_text('{"auths": {}}')
    async with client(registry_htpasswd, CredentialStore([tmp_path / "auth.json"])) as c:
        with pytest.raises(Unauthorized) as exc:
            await c.resolve(ref)
    assert registry_htpasswd.address in str(exc.value) and "none were found" in str(exc.value)


async def test_basic_auth_wrong_password(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    ref = registry_htpasswd.push_fixture("esgz")
    f = tmp_path / "auth.json"
    f.write_text(
        json.dumps(
            {
                "auths": {
                    registry_htpasswd.address: {"auth": base64.b64encode(b"alsd:wrong").decode()}
                }
            }
        )
    )
    async with client(registry_htpasswd, CredentialStore([f])) as c:
        with pytest.raises(Unauthorized, match="even after authenticating"):
            await c.resolve(ref)


async def test_malformed_auth_file_names_the_file(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    ref = registry_htpasswd.push_fixture("esgz")
    f = tmp_path / "auth.json"
    f.write_text("{not json")
    async with client(registry_htpasswd, CredentialStore([f])) as c:
        with pytest.raises(ConfigError, match=str(f)):
            await c.resolve(ref)


async def test_anonymous_bearer(registry_token: RegistryServer, fixtures: object) -> None:
    ref = registry_token.push_fixture("esgz")
    ts = registry_token.token_server
    assert ts is not None
    before = len(ts.requests)
    async with client(registry_token, None) as c:
        img = await c.resolve(ref)
        layer = img.manifest.layers[0]
        await c.read_ranges(ref, layer.digest, [(0, 10)])
        await c.blob_size(ref, layer.digest)
    mine = ts.requests[before:]
    # One token for the whole session: cached per (host, scope).
    assert [(r["method"], r["user"], r["scopes"]) for r in mine] == [
        ("GET", "", ["repository:fx:pull"])
    ]


async def test_bearer_with_credentials_posts_then_caches(
    registry_token: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    ref = registry_token.push_fixture("esgz")
    ts = registry_token.token_server
    assert ts is not None
    before = len(ts.requests)
    creds = CredentialStore([registry_token.write_auth_json(tmp_path / "auth.json")])
    async with client(registry_token, creds) as c:
        await c.resolve(ref)
        await c.resolve(ref)
    assert [(r["method"], r["user"]) for r in ts.requests[before:]] == [("POST", "alsd")]


async def test_helper_credentials_win_over_files(
    registry_token: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    ref = registry_token.push_fixture("esgz")
    ts = registry_token.token_server
    assert ts is not None
    (tmp_path / "auth.json").write_text("{}")
    helper = HelperCredentials()
    helper.add_json(json.dumps({ref: {"username": "alsd", "password": registry_token.password}}))
    before = len(ts.requests)
    async with client(
        registry_token, CredentialStore([tmp_path / "auth.json"], helper=helper)
    ) as c:
        await c.resolve(ref)
    assert [r["user"] for r in ts.requests[before:]] == ["alsd"]


async def test_token_renewed_on_401(registry_token: RegistryServer, fixtures: object) -> None:
    ref = registry_token.push_fixture("esgz")
    ts = registry_token.token_server
    assert ts is not None
    async with client(registry_token, None) as c:
        await c.resolve(ref)
        before = len(ts.requests)
        # White-box: make the cached token one the registry refuses (as a revoked or
        # expired token would be), with a far expiry so only a 401 can renew it.
        key = next(iter(c.authorizer._tokens))
        c.authorizer._tokens[key] = ("not-a-jwt", c.authorizer._tokens[key][1] + 3600)
        img = await c.resolve(ref)
        assert img.manifest_digest == fixture_manifest("esgz")[0]
    assert len(ts.requests) == before + 1


async def test_token_refused_without_credentials(tmp_path: Path, fixtures: object) -> None:
    with running_registry(tmp_path, auth="token", allow_anonymous=False) as server:
        ref = server.push_fixture("gzip")
        async with client(server, None) as c:
            with pytest.raises(Unauthorized) as exc:
                await c.resolve(ref)
        assert "refused anonymous" in str(exc.value) and "fx:gzip" in str(exc.value)
        creds = CredentialStore([server.write_auth_json(tmp_path / "auth.json")])
        async with client(server, creds) as c:
            await c.resolve(ref)


async def test_token_expiry_default_and_short(tmp_path: Path, fixtures: object) -> None:
    # expires_in omitted -> 60 s by the Docker token spec; we cache it with a margin.
    with running_registry(tmp_path, auth="token", token_expires_in_s=None) as server:
        ref = server.push_fixture("gzip")
        async with client(server, None) as c:
            await c.resolve(ref)
            ((_token, expiry),) = c.authorizer._tokens.values()
            assert 0 < expiry - time.monotonic() <= 60


async def test_expired_token_is_renewed_before_use(
    registry_token: RegistryServer, fixtures: object
) -> None:
    ref = registry_token.push_fixture("esgz")
    ts = registry_token.token_server
    assert ts is not None
    async with client(registry_token, None) as c:
        await c.resolve(ref)
        before = len(ts.requests)
        await c.resolve(ref)
        assert len(ts.requests) == before  # still valid: reused
        # White-box: let the cached token reach its expiry (instead of waiting for it).
        ((key, (token, _)),) = c.authorizer._tokens.items()
        c.authorizer._tokens[key] = (token, time.monotonic() - 1)
        await c.resolve(ref)
        assert len(ts.requests) == before + 1
        assert c.authorizer._tokens[key][0] != token
