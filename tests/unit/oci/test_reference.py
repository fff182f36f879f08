"""Image references normalised like podman (containers/image docker reference rules)."""

from __future__ import annotations

import pytest

from alsd.oci.reference import InvalidReference, Reference, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("registry-1.docker.io/foo/bar:x", "docker.io", "foo/bar", "x", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("quay.io/podman/stable", "quay.io", "podman/stable", "latest", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None),
        ("127.0.0.1:5000/fx:esgz", "127.0.0.1:5000", "fx", "esgz", None),
        (f"127.0.0.1:5000/fx@{D}", "127.0.0.1:5000", "fx", None, D),
        (f"127.0.0.1:5000/fx:esgz@{D}", "127.0.0.1:5000", "fx", "esgz", D),
        (f"busybox@{D}", "docker.io", "library/busybox", None, D),
        ("docker://quay.io/a/b:c", "quay.io", "a/b", "c", None),
        ("Host/app", "Host", "app", "latest", None),  # upper case first part = a host
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
        ("a.b/c__d/e-f.g", "a.b", "c__d/e-f.g", "latest", None),
    ],
)
def test_parse(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert ref == Reference(registry, repository, tag, digest)


def test_api_host_and_strings() -> None:
    ref = parse_reference("busybox")
    assert ref.api_host == "registry-1.docker.io"
    assert str(ref) == "docker.io/library/busybox:latest"
    assert ref.name == "docker.io/library/busybox"
    assert ref.object == "latest"
    both = parse_reference(f"quay.io/a:t@{D}")
    assert both.api_host == "quay.io"
    assert both.object == D  # the digest is what is pulled
    assert str(both) == f"quay.io/a:t@{D}"
    assert parse_reference(str(both)) == both
    assert parse_reference("quay.io/a").with_digest(D).object == D
    assert parse_reference("quay.io/a", default_tag=None).tag is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("UPPER", "lowercase"),
        ("quay.io/Upper/x", "lowercase"),
        ("quay.io/a:-bad", "bad tag"),
        ("quay.io/a:" + "t" * 129, "bad tag"),
        ("quay.io/a@sha256:abc", "64"),
        ("quay.io/a@nodigest", "bad digest"),
        ("quay.io/a//b", "lowercase"),
        ("quay.io/a/", "lowercase"),
        ("-bad.io/a", "bad registry"),
    ],
)
def test_invalid(text: str, why: str) -> None:
    with pytest.raises(InvalidReference, match=why):
        parse_reference(text)
