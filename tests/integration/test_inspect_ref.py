"""``alsd inspect REF`` behind bearer-token auth (distribution's ``auth.token``), as a real
subprocess. Every fixture tag, anonymous registries, htpasswd and the one-line failures
are covered in test_registry_inspect.py; this adds the token flow podman users meet on
public registries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.registry import RegistryServer, fixture_manifest, running_registry

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry


def inspect(ref: str, tmp_path: Path, conf: Path, auth: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        CONTAINERS_REGISTRIES_CONF=str(conf),
        REGISTRY_AUTH_FILE=str(auth),
        HOME=str(tmp_path / "home"),
        XDG_RUNTIME_DIR=str(tmp_path / "xdg-run"),
    )
    return subprocess.run(
        [sys.executable, "-m", "alsd", "inspect", "--json", ref],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def image_bytes(tag: str) -> int:
    _, manifest = fixture_manifest(tag)
    doc = json.loads(manifest)
    return len(manifest) + doc["config"]["size"] + sum(x["size"] for x in doc["layers"])


@pytest.mark.parametrize("with_credentials", [False, True])
def test_inspect_with_bearer_tokens(
    registry_token: RegistryServer, fixtures: object, tmp_path: Path, with_credentials: bool
) -> None:
    ref = registry_token.push_fixture("esgz")
    conf = registry_token.write_registries_conf(tmp_path / "registries.conf")
    auth = tmp_path / "auth.json"
    if with_credentials:
        registry_token.write_auth_json(auth)
    else:
        auth.write_text('{"auths": {}}')
    assert registry_token.token_server is not None
    before = len(registry_token.token_server.requests)
    r = inspect(ref, tmp_path, conf, auth)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    assert out["manifest_digest"] == fixture_manifest("esgz")[0]
    assert [(x["format"], x["verified"]) for x in out["layers"]] == [("estargz", True)] * 2
    assert out["layers"][0]["prefetch"] == "landmark"
    assert 0 < out["bytes_fetched"] < image_bytes("esgz") // 10
    asked = registry_token.token_server.requests[before:]
    assert asked, "no token was asked for"
    assert {q["user"] for q in asked} == ({"alsd"} if with_credentials else {""})
    # A read-only command asks for pull only.
    assert all(s.endswith(":pull") for q in asked for s in q["scopes"]), asked


def test_inspect_token_server_refuses_anonymous(
    fixtures: object, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_registry(
        tmp_path_factory.mktemp("registry-private"), auth="token", allow_anonymous=False
    ) as reg:
        ref = reg.push_fixture("esgz")
        auth = tmp_path / "auth.json"
        auth.write_text('{"auths": {}}')
        r = inspect(ref, tmp_path, reg.write_registries_conf(tmp_path / "r.conf"), auth)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert ref in lines[0] and "token server" in lines[0] and "anonymous" in lines[0]
