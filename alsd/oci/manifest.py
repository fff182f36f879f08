"""OCI / Docker v2 manifests, indexes (manifest lists) and image configs; platform choice.

Bytes in, frozen dataclasses out. Schema 1 manifests are refused (as containerd and
stargz do). The platform is picked from an index like containerd's
``FetchManifestPlatform``: same OS and architecture, best variant, first in index order.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from alsd.errors import FormatError, IntegrityError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

#: The Accept header for manifest GETs (spec.md §5.1).
ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

_EMPTY: Mapping[str, str] = MappingProxyType({})


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_digest(data: bytes, digest: str, what: str) -> None:
    """Raise :class:`IntegrityError` unless ``data`` hashes to ``digest`` (sha256/sha512)."""
    algo, sep, expected = digest.partition(":")
    if not sep or algo not in ("sha256", "sha512"):
        raise IntegrityError(f"{what}: unsupported digest {digest!r}")
    actual = hashlib.new(algo, data).hexdigest()
    if actual != expected:
        raise IntegrityError(f"{what}: content has digest {algo}:{actual}, expected {digest}")


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return s + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    urls: tuple[str, ...] = ()
    platform: Platform | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True, slots=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True, slots=True)
class ImageConfig:
    diff_ids: tuple[str, ...]
    os: str
    architecture: str
    variant: str | None = None


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise FormatError(f"{what}: expected a JSON object")
    return v


def _str(d: Mapping[str, Any], key: str, what: str, *, required: bool = True) -> str | None:
    v = d.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or (required and not v):
        raise FormatError(f"{what}: {key!r} must be a non-empty string")
    return v


def _annotations(v: Any, what: str) -> Mapping[str, str]:
    if v is None:
        return _EMPTY
    d = _obj(v, f"{what} annotations")
    if not all(isinstance(k, str) and isinstance(x, str) for k, x in d.items()):
        raise FormatError(f"{what}: annotations must map strings to strings")
    return MappingProxyType(dict(d))


def _platform_of(v: Any, what: str) -> Platform | None:
    if v is None:
        return None
    d = _obj(v, f"{what} platform")
    os_ = _str(d, "os", what, required=False) or ""
    arch = _str(d, "architecture", what, required=False) or ""
    return Platform(
        os_,
        arch,
        _str(d, "variant", what, required=False) or None,
        _str(d, "os.version", what, required=False) or None,
    )


def _descriptor(v: Any, what: str) -> Descriptor:
    d = _obj(v, what)
    media_type = _str(d, "mediaType", what)
    digest = _str(d, "digest", what)
    assert media_type is not None and digest is not None
    if ":" not in digest:
        raise FormatError(f"{what}: bad digest {digest!r}")
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{what}: 'size' must be a non-negative integer")
    urls = d.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise FormatError(f"{what}: 'urls' must be a list of strings")
    return Descriptor(
        media_type,
        digest,
        size,
        _annotations(d.get("annotations"), what),
        tuple(urls),
        _platform_of(d.get("platform"), what),
    )


def parse_manifest(data: bytes, content_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or an index; ``content_type`` is the HTTP Content-Type, if any.

    The media type is taken from the body's ``mediaType`` field, else from the
    Content-Type, else guessed from the shape (``manifests`` → OCI index).
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"manifest is not JSON: {exc}") from exc
    d = _obj(doc, "manifest")
    ct = (content_type or "").split(";")[0].strip().lower() or None
    media_type = d.get("mediaType")
    if media_type is not None and not isinstance(media_type, str):
        raise FormatError("manifest: 'mediaType' must be a string")
    if not media_type:
        if ct in INDEX_TYPES or ct in MANIFEST_TYPES:
            media_type = ct
        elif "manifests" in d:
            media_type = OCI_INDEX
        else:
            media_type = OCI_MANIFEST
    assert media_type is not None
    if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED) or d.get("schemaVersion") == 1:
        raise FormatError("manifest: Docker schema 1 manifests are not supported")
    if d.get("schemaVersion") != 2:
        raise FormatError(f"manifest: schemaVersion must be 2, got {d.get('schemaVersion')!r}")
    annotations = _annotations(d.get("annotations"), "manifest")
    if media_type in INDEX_TYPES:
        entries = d.get("manifests")
        if not isinstance(entries, list):
            raise FormatError("index: 'manifests' must be a list")
        return Index(
            media_type,
            tuple(_descriptor(e, f"index entry {i}") for i, e in enumerate(entries)),
            annotations,
        )
    if media_type not in MANIFEST_TYPES:
        raise FormatError(f"manifest: unsupported media type {media_type!r}")
    layers = d.get("layers")
    if not isinstance(layers, list):
        raise FormatError("manifest: 'layers' must be a list")
    return Manifest(
        media_type,
        _descriptor(d.get("config"), "manifest config"),
        tuple(_descriptor(x, f"manifest layer {i}") for i, x in enumerate(layers)),
        annotations,
    )


def parse_config(data: bytes) -> ImageConfig:
    """Parse an image config; only what a layer store needs (rootfs.diff_ids, platform)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"image config is not JSON: {exc}") from exc
    d = _obj(doc, "image config")
    rootfs = _obj(d.get("rootfs"), "image config rootfs")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(isinstance(x, str) and ":" in x for x in diff_ids):
        raise FormatError("image config: rootfs.diff_ids must be a list of digests")
    return ImageConfig(
        tuple(diff_ids),
        _str(d, "os", "image config", required=False) or "",
        _str(d, "architecture", "image config", required=False) or "",
        _str(d, "variant", "image config", required=False) or None,
    )


_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "armhf": "arm",
    "arm": "arm",
    "i386": "386",
    "i686": "386",
    "386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def normalize_platform(p: Platform) -> Platform:
    """containerd ``platforms.Normalize``: arch aliases, and default variants
    (arm64 → v8, arm → v7) so that an absent variant compares equal to the default."""
    arch = _ARCH_ALIASES.get(p.architecture.lower(), p.architecture.lower())
    variant = p.variant
    if arch == "arm64" and variant in (None, "", "8", "v8"):
        variant = "v8"
    elif arch == "arm" and variant in (None, "", "7"):
        variant = "v7"
    elif arch == "amd64" and variant in ("", "v1"):
        variant = None
    return Platform(p.os.lower(), arch, variant or None, p.os_version)


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    variant = {"armv6l": "v6", "armv7l": "v7"}.get(machine)
    return normalize_platform(Platform("linux", machine, variant))


def _variant_rank(want: Platform, have: Platform) -> int | None:
    """0 = exact, higher = worse but compatible, None = incompatible."""
    if have.variant == want.variant:
        return 0
    if want.architecture == "arm" and want.variant and have.variant:
        # An armv7 host runs v6 and v5 images (containerd's arm matcher).
        try:
            w, h = int(want.variant.lstrip("v")), int(have.variant.lstrip("v"))
        except ValueError:
            return None
        return w - h if h < w else None
    return None


def select_platform(index: Index, want: Platform | None = None) -> Descriptor:
    """Pick the manifest for ``want`` (default: the host), first best match in index order.

    Raises :class:`FormatError` naming the wanted platform when nothing matches.
    """
    w = normalize_platform(want or host_platform())
    best: tuple[int, int, Descriptor] | None = None
    for pos, desc in enumerate(index.manifests):
        if desc.media_type not in MANIFEST_TYPES and desc.media_type not in INDEX_TYPES:
            continue
        if desc.platform is None:
            continue
        have = normalize_platform(desc.platform)
        if have.os != w.os or have.architecture != w.architecture:
            continue
        rank = _variant_rank(w, have)
        if rank is None:
            continue
        if best is None or (rank, pos) < best[:2]:
            best = (rank, pos, desc)
    if best is None:
        offered: Sequence[str] = [str(d.platform) for d in index.manifests if d.platform]
        raise FormatError(
            f"no manifest for platform {w} in index (offers: {', '.join(offered) or 'none'})"
        )
    return best[2]
