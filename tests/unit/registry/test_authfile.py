"""Credentials the way containers/image finds them, plus podman's ALS auth-helper JSON."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from alsd.errors import ConfigError
from alsd.oci.auth import Credentials
from alsd.registry.authfile import (
    AuthFile,
    CredentialStore,
    HelperCredentials,
    auth_keys,
    default_auth_paths,
    normalize_registry_key,
    parse_helper_json,
)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("quay.io", "quay.io"),
        ("docker.io", "index.docker.io"),
        ("registry-1.docker.io", "index.docker.io"),
        ("https://index.docker.io/v1/", "index.docker.io"),
        ("http://localhost:5000/v2/", "localhost:5000"),
        ("quay.io/ns/repo", "quay.io/ns/repo"),
        ("docker.io/library/busybox", "index.docker.io/library/busybox"),
    ],
)
def test_normalize(key: str, want: str) -> None:
    assert normalize_registry_key(key) == want


def test_auth_keys_longest_first() -> None:
    assert auth_keys("quay.io", "a/b/c") == ["quay.io/a/b/c", "quay.io/a/b", "quay.io/a", "quay.io"]
    assert auth_keys("docker.io", "library/x")[-1] == "index.docker.io"


def test_default_paths() -> None:
    env = {"XDG_RUNTIME_DIR": "/r", "XDG_CONFIG_HOME": "/c", "DOCKER_CONFIG": "/d", "HOME": "/h"}
    assert default_auth_paths(env) == [
        Path("/r/containers/auth.json"), Path("/c/containers/auth.json"),
        Path("/d/config.json"), Path("/h/.dockercfg"),
    ]  # fmt: skip
    assert default_auth_paths({"HOME": "/h"}, uid=1234) == [
        Path("/run/containers/1234/auth.json"), Path("/h/.config/containers/auth.json"),
        Path("/h/.docker/config.json"), Path("/h/.dockercfg"),
    ]  # fmt: skip


async def test_search_order_and_repository_keys(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "HOME": str(tmp_path / "home")}
    write(tmp_path / "run/containers/auth.json", {"auths": {
        "quay.io/team": {"auth": b64("team:pw1")},
        "quay.io": {"auth": b64("host:pw2")},
    }})  # fmt: skip
    write(tmp_path / "home/.config/containers/auth.json", {"auths": {
        "quay.io/team/app": {"auth": b64("shadowed:x")},
        "ghcr.io": {"auth": b64("gh:pw3")},
        "https://index.docker.io/v1/": {"auth": b64("hub:pw4"), "identitytoken": "idt"},
    }})  # fmt: skip
    write(tmp_path / "home/.dockercfg", {"legacy.io": {"auth": b64("old:pw5"), "email": "x"}})
    store = CredentialStore(env=env)
    # The first file that has any matching key wins, longest key first within it.
    assert await store.lookup("quay.io", "team/app") == Credentials("team", "pw1")
    assert await store.lookup("quay.io", "other/app") == Credentials("host", "pw2")
    assert await store.lookup("ghcr.io", "x/y") == Credentials("gh", "pw3")
    assert await store.lookup("docker.io", "library/busybox") == Credentials("hub", "pw4", "idt")
    assert await store.lookup("legacy.io", "a") == Credentials("old", "pw5")
    assert await store.lookup("nothing.io", "a") is None


async def test_explicit_file_replaces_search(tmp_path: Path) -> None:
    f = write(tmp_path / "mine.json", {"auths": {"r.io": {"auth": b64("me:pw")}}})
    assert await CredentialStore([f]).lookup("r.io", "x") == Credentials("me", "pw")
    assert await CredentialStore([tmp_path / "absent.json"]).lookup("r.io", "x") is None


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        (json.dumps({"auths": []}), "'auths' must be an object"),
        (json.dumps({"auths": {"r.io": "x"}}), "must be an object"),
        (json.dumps({"auths": {"r.io": {"auth": "!!!"}}}), "not base64"),
        (json.dumps({"auths": {"r.io": {"auth": b64("nocolon")}}}), "user:password"),
        (json.dumps({"auths": {}, "credHelpers": {"r.io": 5}}), "credHelpers"),
        (json.dumps({"auths": {}, "credsStore": 5}), "credsStore"),
    ],
)
async def test_malformed_names_file(tmp_path: Path, content: str, why: str) -> None:
    f = tmp_path / "auth.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=why) as exc:
        await CredentialStore([f]).lookup("r.io", "x")
    assert str(f) in str(exc.value)
    with pytest.raises(ConfigError):
        CredentialStore([f]).check()


def fake_helper(bindir: Path, name: str, script: str) -> None:
    """A real executable docker-credential-NAME on PATH (a shell script)."""
    p = bindir / f"docker-credential-{name}"
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


async def test_cred_helpers_and_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    # Echo what the helper got on stdin back as the username, to check the server key.
    fake_helper(
        bindir,
        "echo",
        'read s; printf \'{"ServerURL":"%s","Username":"%s","Secret":"sec"}\' "$s" "$s"\n',
    )
    fake_helper(bindir, "tok", 'read s; echo \'{"Username":"<token>","Secret":"idtok"}\'\n')
    fake_helper(bindir, "none", "echo 'credentials not found in native keychain'; exit 1\n")
    fake_helper(bindir, "broken", "echo boom >&2; exit 3\n")
    f = write(tmp_path / "config.json", {
        "auths": {"plain.io": {"auth": b64("p:q")}},
        "credHelpers": {"h.io": "echo", "docker.io": "echo", "t.io": "tok", "n.io": "none",
                        "b.io": "broken"},
        "credsStore": "tok",
    })  # fmt: skip
    store = CredentialStore([f])
    assert await store.lookup("h.io", "x") == Credentials("h.io", "sec")
    assert await store.lookup("docker.io", "library/x") == Credentials(
        "https://index.docker.io/v1/", "sec"
    )
    assert await store.lookup("t.io", "x") == Credentials("", "", "idtok")
    assert await store.lookup("n.io", "x") is None
    with pytest.raises(ConfigError, match=r"docker-credential-broken.*boom"):
        await store.lookup("b.io", "x")
    # auths before credsStore; credsStore for everything else.
    assert await store.lookup("plain.io", "x") == Credentials("p", "q")
    assert await store.lookup("other.io", "x") == Credentials("", "", "idtok")
    missing = write(tmp_path / "m.json", {"credHelpers": {"z.io": "does-not-exist"}})
    with pytest.raises(ConfigError, match="cannot run"):
        await CredentialStore([missing]).lookup("z.io", "x")


def test_helper_json() -> None:
    data = json.dumps({
        "quay.io/team/app:latest": {"username": "u", "password": "p"},
        "docker.io/library/busybox@sha256:" + "a" * 64: {"identityToken": "idt"},
        "127.0.0.1:5000/fx:esgz": {},
    })  # fmt: skip
    got = parse_helper_json(data)
    assert got == {
        ("quay.io", "team/app"): Credentials("u", "p"),
        ("docker.io", "library/busybox"): Credentials("", "", "idt"),
        ("127.0.0.1:5000", "fx"): Credentials(),
    }


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ("nope", "not JSON"),
        ("[]", "JSON object"),
        ('{"quay.io/UPPER": {}}', "invalid image reference"),
        ('{"quay.io/x": 5}', "must be an object"),
        ('{"quay.io/x": {"username": 5}}', "must be strings"),
    ],
)
def test_helper_json_bad(data: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_helper_json(data)


async def test_helper_credentials_preferred(tmp_path: Path) -> None:
    f = write(tmp_path / "auth.json", {"auths": {"quay.io": {"auth": b64("file:pw")}}})
    helper = HelperCredentials()
    assert (
        helper.add_json(
            json.dumps(
                {
                    "quay.io/team/app:1": {"username": "mem", "password": "pw"},
                    "quay.io/other:1": {"username": "o", "password": "pw"},
                }
            )
        )
        == 2
    )
    store = CredentialStore([f], helper=helper)
    assert await store.lookup("quay.io", "team/app") == Credentials("mem", "pw")
    # Same registry, another repository: the helper's credentials for that host.
    assert (await store.lookup("quay.io", "x/y")) in (
        Credentials("mem", "pw"),
        Credentials("o", "pw"),
    )
    assert await store.lookup("ghcr.io", "x") is None
    helper.clear()
    assert await store.lookup("quay.io", "team/app") == Credentials("file", "pw")


def test_authfile_load_empty(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("")
    assert AuthFile.load(tmp_path / "a.json") is None
