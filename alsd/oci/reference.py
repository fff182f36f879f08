"""Image references, parsed and normalised the way podman (containers/image) does.

``busybox`` → ``docker.io/library/busybox:latest``; ``index.docker.io`` → ``docker.io``;
``name:tag@sha256:…`` keeps both (the digest is what is pulled). The API host of
``docker.io`` is ``registry-1.docker.io``. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alsd.errors import InvalidReference as InvalidReference  # re-exported for callers

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# Grammar of github.com/distribution/reference (reference.go).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Reference:
    """A fully qualified image reference.

    ``registry`` is the registry *name* as users write it (``docker.io``,
    ``quay.io``, ``127.0.0.1:5000``); :attr:`api_host` is where the API lives.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def object(self) -> str:
        """What ``/v2/<repo>/manifests/<object>`` asks for: the digest if known, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def _validate_digest(digest: str, text: str) -> None:
    if not _DIGEST_RE.fullmatch(digest):
        raise InvalidReference(f"invalid image reference {text!r}: bad digest {digest!r}")
    algo, _, hexpart = digest.partition(":")
    if algo == "sha256" and not _HEX64.fullmatch(hexpart):
        raise InvalidReference(
            f"invalid image reference {text!r}: sha256 digest needs 64 lowercase hex digits"
        )


def _split_domain(name: str) -> tuple[str, str]:
    """containers/image splitDockerDomain: the first component is a registry when it
    looks like a host (has ``.`` or ``:``, or is ``localhost``) — otherwise docker.io."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, remainder = first, rest
    else:
        domain, remainder = DOCKER_HUB, name
    if domain in _HUB_ALIASES:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"
    return domain, remainder


def parse_reference(text: str, *, default_tag: str | None = "latest") -> Reference:
    """Parse and normalise ``text``; a reference with neither tag nor digest gets ``default_tag``.

    Raises :class:`InvalidReference`.
    """
    s = text.strip()
    if s.startswith("docker://"):
        s = s[len("docker://") :]
    if not s:
        raise InvalidReference("invalid image reference '': empty")
    digest: str | None = None
    if "@" in s:
        s, _, digest = s.partition("@")
        _validate_digest(digest, text)
    tag: str | None = None
    # A ":" after the last "/" is a tag separator; one before it belongs to a host:port.
    last_slash = s.rfind("/")
    colon = s.rfind(":")
    if colon > last_slash:
        s, tag = s[:colon], s[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid image reference {text!r}: bad tag {tag!r}")
    domain, repository = _split_domain(s)
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidReference(f"invalid image reference {text!r}: bad registry {domain!r}")
    if not _NAME_RE.fullmatch(repository):
        raise InvalidReference(
            f"invalid image reference {text!r}: repository {repository!r} must be lowercase "
            "path components of [a-z0-9._-]"
        )
    if len(domain) + 1 + len(repository) > 255:
        raise InvalidReference(f"invalid image reference {text!r}: name longer than 255")
    if tag is None and digest is None:
        tag = default_tag
    return Reference(domain, repository, tag, digest)


def normalize_registry_name(host: str) -> str:
    """``index.docker.io`` / ``registry-1.docker.io`` → ``docker.io``; others unchanged."""
    return DOCKER_HUB if host in _HUB_ALIASES else host
