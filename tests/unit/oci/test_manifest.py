"""Manifests, indexes, configs and platform choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alsd.errors import FormatError, IntegrityError
from alsd.oci.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Index,
    Manifest,
    Platform,
    normalize_platform,
    parse_config,
    parse_manifest,
    select_platform,
    sha256_digest,
    verify_digest,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def manifest(media_type: str | None = OCI_MANIFEST, **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": D1, "size": 7},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 100,
             "annotations": {"containerd.io/snapshot/stargz/toc.digest": D3}},
        ],
    }  # fmt: skip
    if media_type:
        doc["mediaType"] = media_type
    doc.update(extra)
    return json.dumps(doc).encode()


def entry(digest: str, arch: str, variant: str | None = None, os: str = "linux") -> dict[str, Any]:
    p: dict[str, Any] = {"os": os, "architecture": arch}
    if variant:
        p["variant"] = variant
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": 1, "platform": p}


def index(*entries: dict[str, Any], media_type: str = OCI_INDEX) -> Index:
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": list(entries)}
    parsed = parse_manifest(json.dumps(doc).encode())
    assert isinstance(parsed, Index)
    return parsed


def test_oci_manifest() -> None:
    m = parse_manifest(manifest())
    assert isinstance(m, Manifest)
    assert m.media_type == OCI_MANIFEST
    assert m.config.digest == D1 and m.config.size == 7
    assert [x.digest for x in m.layers] == [D2]
    assert m.layers[0].annotations["containerd.io/snapshot/stargz/toc.digest"] == D3
    with pytest.raises(TypeError):
        m.layers[0].annotations["x"] = "y"  # type: ignore[index]


def test_media_type_from_header_or_shape() -> None:
    m = parse_manifest(manifest(None), f"{DOCKER_MANIFEST}; charset=utf-8")
    assert m.media_type == DOCKER_MANIFEST
    assert parse_manifest(manifest(None)).media_type == OCI_MANIFEST
    i = parse_manifest(json.dumps({"schemaVersion": 2, "manifests": []}).encode())
    assert isinstance(i, Index) and i.media_type == OCI_INDEX
    i = parse_manifest(json.dumps({"schemaVersion": 2, "manifests": []}).encode(), DOCKER_LIST)
    assert i.media_type == DOCKER_LIST


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "schema 1"),
        (manifest(schemaVersion=3), "schemaVersion"),
        (manifest("application/x-foo"), "unsupported media type"),
        (manifest(layers={}), "'layers' must be a list"),
        (manifest(layers=[{"mediaType": "x", "digest": D2, "size": -1}]), "non-negative"),
        (manifest(layers=[{"mediaType": "x", "digest": "nocolon", "size": 1}]), "bad digest"),
        (manifest(layers=[{"digest": D2, "size": 1}]), "mediaType"),
        (manifest(annotations={"a": 1}), "annotations"),
        (manifest(config=None), "manifest config"),
    ],
)
def test_bad_manifests(data: bytes, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        parse_manifest(data)


def test_config() -> None:
    c = parse_config(json.dumps({
        "architecture": "arm64", "os": "linux", "variant": "v8",
        "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
    }).encode())  # fmt: skip
    assert c.diff_ids == (D1, D2) and c.architecture == "arm64" and c.variant == "v8"
    for bad in (
        b"{}",
        b'{"rootfs": {"diff_ids": "x"}}',
        b'{"rootfs": {"diff_ids": ["nodigest"]}}',
        b"x",
    ):
        with pytest.raises(FormatError):
            parse_config(bad)


def test_fixture_configs(fixtures: Path) -> None:
    """Every config in the fixture layout (made by podman / ctr-remote) parses."""
    idx = json.loads((fixtures / "images" / "index.json").read_text())
    for desc in idx["manifests"]:
        data = (fixtures / "images" / "blobs" / "sha256" / desc["digest"][7:]).read_bytes()
        verify_digest(data, desc["digest"], "fixture")
        m = parse_manifest(data, desc["mediaType"])
        assert isinstance(m, Manifest)
        cfg = (fixtures / "images" / "blobs" / "sha256" / m.config.digest[7:]).read_bytes()
        assert len(parse_config(cfg).diff_ids) == len(m.layers) == 2


def test_digests() -> None:
    assert (
        sha256_digest(b"")
        == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    verify_digest(b"", sha256_digest(b""), "x")
    with pytest.raises(IntegrityError, match="thing: content has digest"):
        verify_digest(b"a", sha256_digest(b""), "thing")
    with pytest.raises(IntegrityError, match="unsupported"):
        verify_digest(b"a", "md5:00", "thing")


def test_select_platform() -> None:
    idx = index(
        entry(D1, "arm", "v6"),
        entry(D2, "arm64"),
        entry(D3, "amd64"),
        {**entry("sha256:" + "9" * 64, "unknown", os="unknown")},  # attestation manifest
    )
    assert select_platform(idx, Platform("linux", "amd64")).digest == D3
    assert select_platform(idx, Platform("linux", "x86_64")).digest == D3
    assert select_platform(idx, Platform("linux", "aarch64")).digest == D2
    assert select_platform(idx, Platform("linux", "arm64", "v8")).digest == D2
    # An armv7 host runs armv6 images when there is nothing better.
    assert select_platform(idx, Platform("linux", "arm", "v7")).digest == D1
    with pytest.raises(FormatError, match="no manifest for platform linux/s390x"):
        select_platform(idx, Platform("linux", "s390x"))
    with pytest.raises(FormatError):
        select_platform(idx, Platform("windows", "amd64"))


def test_select_prefers_exact_variant_then_index_order() -> None:
    idx = index(entry(D1, "arm", "v6"), entry(D2, "arm", "v7"), entry(D3, "arm", "v7"))
    assert select_platform(idx, Platform("linux", "arm", "v7")).digest == D2
    assert select_platform(idx, Platform("linux", "arm", "v6")).digest == D1


def test_normalize() -> None:
    assert normalize_platform(Platform("Linux", "aarch64")) == Platform("linux", "arm64", "v8")
    assert normalize_platform(Platform("linux", "armhf")) == Platform("linux", "arm", "v7")
    assert normalize_platform(Platform("linux", "x86_64")) == Platform("linux", "amd64")
