"""``alsd inspect REF`` against the real docker-registry, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.registry import RegistryServer, fixture_blob_path, fixture_manifest, free_port

pytest_plugins = ["tests.support.registry"]

pytestmark = pytest.mark.registry

LAZY = {
    "esgz": "estargz",
    "esgz-noopt": "estargz",
    "zstdchunked-podman43": "zstd:chunked",
    "zstdchunked-podman54": "zstd:chunked",
    "zstdchunked-stargz": "zstd:chunked",
}


def alsd_inspect(
    ref: str, registries_conf: Path, auth_file: Path | None = None, *args: str
) -> subprocess.CompletedProcess[str]:
    """``alsd inspect --json REF`` (ARGS instead of --json if given)."""
    env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=str(registries_conf))
    if auth_file is not None:
        env["REGISTRY_AUTH_FILE"] = str(auth_file)
    else:
        env.pop("REGISTRY_AUTH_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "alsd", "inspect", *(args or ["--json"]), ref],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def image_bytes(tag: str) -> int:
    _, manifest = fixture_manifest(tag)
    doc = json.loads(manifest)
    total: int = len(manifest) + doc["config"]["size"] + sum(x["size"] for x in doc["layers"])
    return total


@pytest.mark.parametrize("tag", [*LAZY, "gzip"])
def test_inspect_every_tag(
    registry: RegistryServer, fixtures: object, tmp_path: Path, tag: str
) -> None:
    ref = registry.push_fixture(tag)
    r = alsd_inspect(ref, registry.write_registries_conf(tmp_path / "registries.conf"))
    assert r.returncode == (1 if tag == "gzip" else 0), r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    digest, manifest = fixture_manifest(tag)
    assert out["reference"] == ref and out["manifest_digest"] == digest
    descs = json.loads(manifest)["layers"]
    assert [(x["digest"], x["size"], x["media_type"]) for x in out["layers"]] == [
        (d["digest"], d["size"], d["mediaType"]) for d in descs
    ]
    if tag == "gzip":
        assert all(x["format"] is None and x["toc_digest"] is None for x in out["layers"])
        assert all(x["lazy"] is False and "plain gzip" in x["reason"] for x in out["layers"])
        n = len(out["layers"])
        assert f"{n} of {n} layers not lazily pullable: a plain gzip layer" in r.stderr
        return
    assert all(x["lazy"] is True and x["reason"] is None for x in out["layers"])
    for layer in out["layers"]:
        assert layer["format"] == LAZY[tag]
        assert layer["toc_digest"].startswith("sha256:")
        assert layer["verified"] is True  # every fixture layer carries its TOC annotation
    # Only footers and TOCs were read: far less than the image.
    assert 0 < out["bytes_fetched"] < image_bytes(tag) // 10
    if tag == "esgz":
        assert out["layers"][0]["prefetch"] == "landmark"
        assert fixture_blob_path(descs[0]["digest"]).stat().st_size == descs[0]["size"]


def test_inspect_with_credentials(
    registry_htpasswd: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    ref = registry_htpasswd.push_fixture("esgz")
    conf = registry_htpasswd.write_registries_conf(tmp_path / "registries.conf")
    auth = registry_htpasswd.write_auth_json(tmp_path / "auth.json")
    ok = alsd_inspect(ref, conf, auth)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "empty.json").write_text("{}")
    denied = alsd_inspect(ref, conf, tmp_path / "empty.json")
    assert denied.returncode == 1
    assert denied.stdout == ""
    assert len(denied.stderr.strip().splitlines()) == 1
    assert "Unauthorized" in denied.stderr and registry_htpasswd.address in denied.stderr


def test_inspect_text_and_config(
    registry: RegistryServer, fixtures: object, tmp_path: Path
) -> None:
    """Text for a person; --config takes registries.conf and auth file from alsd.toml."""
    lazy = registry.push_fixture("esgz")
    plain = registry.push_fixture("gzip")
    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    (tmp_path / "auth.json").write_text('{"auths": {}}')
    cfg = tmp_path / "alsd.toml"
    cfg.write_text(
        f'[registry]\nregistries_conf = "{conf}"\nauth_file = "{tmp_path / "auth.json"}"\n'
    )
    # The environment's registries.conf does not know the (insecure) registry: only the
    # one named in --config lets alsd reach it over plain HTTP.
    (tmp_path / "empty.conf").write_text("")
    r = alsd_inspect(lazy, tmp_path / "empty.conf", None, "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{lazy}: lazily pullable (")
    assert lines[1].split() == ["manifest", fixture_manifest("esgz")[0]]
    assert lines[2].split() == ["LAYER", "SIZE", "FORMAT", "TOC", "PRIORITISED"]
    assert "estargz" in lines[3] and "verified" in lines[3] and "yes" in lines[3]
    assert "from the registry" in lines[-1]
    r = alsd_inspect(plain, tmp_path / "empty.conf", None, "--config", str(cfg))
    assert r.returncode == 1
    assert "layers not lazily pullable" in r.stdout and "plain" in r.stdout
    assert "podman pulls it whole" in r.stderr and "alsd convert" in r.stderr
    without = alsd_inspect(lazy, tmp_path / "empty.conf", None)
    assert without.returncode == 1  # https to a plain-HTTP registry: cannot connect


@pytest.mark.parametrize("case", ["not-found", "refused", "bad-conf", "bad-ref"])
def test_inspect_failures_are_one_line(registry: RegistryServer, tmp_path: Path, case: str) -> None:
    conf = registry.write_registries_conf(tmp_path / "registries.conf")
    ref = f"{registry.address}/fx:no-such-tag"
    if case == "refused":
        dead = f"127.0.0.1:{free_port()}"
        conf.write_text(f'[[registry]]\nlocation = "{dead}"\ninsecure = true\n')
        ref = f"{dead}/fx:x"
    elif case == "bad-conf":
        conf.write_text("[[registry]]\nlocation = 5\n")
    elif case == "bad-ref":
        ref = "quay.io/UPPER:x"
    r = alsd_inspect(ref, conf)
    # A configuration error or a malformed argument is a usage error (2), the rest failed (1).
    assert r.returncode == (2 if case in ("bad-conf", "bad-ref") else 1), r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    want = {
        "not-found": ["NotFound", registry.address, "no-such-tag"],
        "refused": ["Transient", "cannot connect"],
        "bad-conf": ["ConfigError", str(conf), "'location'"],
        "bad-ref": ["not an image reference", "UPPER"],
    }[case]
    for w in want:
        assert w in lines[0]
