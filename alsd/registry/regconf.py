"""registries.conf (v2, TOML) as podman reads it, and the endpoints a reference maps to.

Files (containers/image ``sysregistriesv2``): the main file is an explicit path, else
``$CONTAINERS_REGISTRIES_CONF``, else ``~/.config/containers/registries.conf`` if it
exists, else ``/etc/containers/registries.conf``; then the drop-ins
``/etc/containers/registries.conf.d/*.conf`` and ``~/.config/containers/registries.conf.d/*.conf``
in lexical order, each overriding earlier ``[[registry]]`` entries with the same prefix
and earlier top-level keys it sets. Endpoints of a reference: the matching entry's
mirrors in order, then the (possibly relocated) registry itself; ``insecure`` means
plain HTTP. Synchronous; done once at start-up.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alsd.errors import ConfigError, Unauthorized
from alsd.oci.reference import DOCKER_HUB, DOCKER_HUB_API_HOST, Reference, parse_reference

SYSTEM_CONF = Path("/etc/containers/registries.conf")
SYSTEM_DROPIN_DIR = Path("/etc/containers/registries.conf.d")

_PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")


@dataclass(frozen=True, slots=True)
class MirrorEntry:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[MirrorEntry, ...] = ()
    source: str = ""  # the file that defined it, for messages


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place to try for a reference."""

    registry: str  # registry name as in references/auth files ("docker.io", "mirror:5000")
    host: str  # host[:port] of the API ("registry-1.docker.io")
    scheme: str  # "https" or "http"
    repository: str  # repository path on that host (after prefix rewriting)
    mirror: bool = False

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def url(self, kind: str, obj: str) -> str:
        """``/v2/<repository>/<kind>/<obj>`` here (kind: ``manifests`` or ``blobs``)."""
        return f"{self.base_url}/v2/{self.repository}/{kind}/{obj}"


@dataclass(frozen=True, slots=True)
class RegistriesConf:
    registries: tuple[RegistryEntry, ...] = ()
    unqualified_search_registries: tuple[str, ...] = ()
    additional_layer_store_auth_helper: str | None = None
    files: tuple[str, ...] = field(default=())  # what was read, in order

    def find(self, ref: Reference) -> RegistryEntry | None:
        """The entry whose prefix matches ``ref`` longest (containers/image semantics)."""
        name = ref.name
        best: RegistryEntry | None = None
        best_len = -1
        for e in self.registries:
            n = _prefix_match_len(e.prefix, name)
            if n > best_len:
                best, best_len = e, n
        return best

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        """Mirrors (in order) then the registry; raises :class:`Unauthorized` if blocked."""
        entry = self.find(ref)
        if entry is None:
            return [_endpoint(ref.name, insecure=False, mirror=False)]
        if entry.blocked:
            where = entry.source or "registries.conf"
            raise Unauthorized(f"{ref}: registry {entry.prefix!r} is blocked in {where}")
        out: list[Endpoint] = []
        by_digest = ref.digest is not None
        for m in entry.mirrors:
            mode = "digest-only" if entry.mirror_by_digest_only else m.pull_from_mirror
            if (mode == "digest-only" and not by_digest) or (mode == "tag-only" and by_digest):
                continue
            out.append(_endpoint(_rewrite(entry, m.location, ref), m.insecure, mirror=True))
        out.append(_endpoint(_rewrite(entry, entry.location, ref), entry.insecure, mirror=False))
        return out


def _prefix_match_len(prefix: str, name: str) -> int:
    """Length of the match of ``prefix`` on ``name``, -1 for no match."""
    if prefix.startswith("*."):
        host = name.split("/", 1)[0]
        return len(prefix) if host.endswith(prefix[1:]) else -1
    if name == prefix:
        return len(prefix)
    if name.startswith(prefix) and name[len(prefix)] in "/@:":
        return len(prefix)
    return -1


def _rewrite(entry: RegistryEntry, location: str, ref: Reference) -> str:
    if entry.prefix.startswith("*."):
        # Wildcard entries cannot relocate; mirrors of them get the repository appended.
        if location == entry.location:
            return ref.name
        return location + "/" + ref.repository
    return location + ref.name[len(entry.prefix) :]


def _endpoint(name: str, insecure: bool, mirror: bool) -> Endpoint:
    registry, _, repository = name.partition("/")
    if registry in ("index.docker.io", DOCKER_HUB_API_HOST):
        registry = DOCKER_HUB
    host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
    return Endpoint(registry, host, "http" if insecure else "https", repository, mirror)


# ---------------------------------------------------------------- parsing


def _bool(d: Mapping[str, Any], key: str, where: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: key {key!r} must be true or false, got {v!r}")
    return v


def _string(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise ConfigError(f"{where}: key {key!r} must be a string, got {v!r}")
    return v


def _validate_location(loc: str, where: str, key: str) -> str:
    loc = loc.rstrip("/")
    if "://" in loc:
        raise ConfigError(f"{where}: key {key!r} must not contain a scheme: {loc!r}")
    return loc


def _parse_registry(d: Any, where: str) -> RegistryEntry:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: [[registry]] must be a table")
    prefix = _validate_location(_string(d, "prefix", where), where, "prefix")
    location = _validate_location(_string(d, "location", where), where, "location")
    if not prefix:
        prefix = location
    if not prefix:
        raise ConfigError(f"{where}: [[registry]] needs 'location' or 'prefix'")
    if prefix.startswith("*.") and location:
        raise ConfigError(f"{where}: key 'location' not allowed with wildcard prefix {prefix!r}")
    if not location:
        location = prefix
    mirrors_raw = d.get("mirror", [])
    if not isinstance(mirrors_raw, list):
        raise ConfigError(f"{where}: key 'mirror' must be an array of tables")
    mirrors: list[MirrorEntry] = []
    for i, m in enumerate(mirrors_raw):
        mwhere = f"{where}, mirror {i}"
        if not isinstance(m, dict):
            raise ConfigError(f"{mwhere}: key 'mirror' must be an array of tables")
        mloc = _validate_location(_string(m, "location", mwhere), mwhere, "location")
        if not mloc:
            raise ConfigError(f"{mwhere}: key 'location' is required")
        pfm = _string(m, "pull-from-mirror", mwhere) or "all"
        if pfm not in _PULL_FROM_MIRROR:
            raise ConfigError(
                f"{mwhere}: key 'pull-from-mirror' must be one of {', '.join(_PULL_FROM_MIRROR)}"
            )
        mirrors.append(MirrorEntry(mloc, _bool(m, "insecure", mwhere), pfm))
    return RegistryEntry(
        prefix,
        location,
        _bool(d, "insecure", where),
        _bool(d, "blocked", where),
        _bool(d, "mirror-by-digest-only", where),
        tuple(mirrors),
        where.split(",")[0],
    )


@dataclass
class _Partial:
    registries: dict[str, RegistryEntry] = field(default_factory=dict)
    search: tuple[str, ...] | None = None
    helper: str | None = None


def _parse_file(path: Path, into: _Partial) -> None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    _parse_text(text, str(path), into)


def _parse_text(text: str, where: str, into: _Partial) -> None:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    if "unqualified-search-registries" in doc:
        v = doc["unqualified-search-registries"]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(
                f"{where}: key 'unqualified-search-registries' must be an array of strings"
            )
        into.search = tuple(v)
    if "additional-layer-store-auth-helper" in doc:
        into.helper = _string(doc, "additional-layer-store-auth-helper", where) or None
    if "registries" in doc and isinstance(doc["registries"], dict):
        # The v1 format ([registries.search] ...): podman 4 still reads it; we refuse
        # clearly instead of silently ignoring mirrors/insecure settings.
        raise ConfigError(f"{where}: key 'registries' is the v1 format; alsd reads only v2")
    regs = doc.get("registry", [])
    if not isinstance(regs, list):
        raise ConfigError(f"{where}: key 'registry' must be an array of tables ([[registry]])")
    for i, r in enumerate(regs):
        e = _parse_registry(r, f"{where}, [[registry]] {i}")
        into.registries[e.prefix] = e  # later files override the same prefix


def _dropins(dirs: list[Path]) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        try:
            out.extend(sorted(p for p in d.iterdir() if p.suffix == ".conf" and p.is_file()))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"{d}: cannot list drop-in directory: {exc}") from exc
    return out


def load_registries_conf(
    path: str | os.PathLike[str] | None = None,
    *,
    dropin_dirs: list[Path] | None = None,
    env: Mapping[str, str] | None = None,
) -> RegistriesConf:
    """Read registries.conf as podman would (see the module docstring).

    ``path`` overrides the main file; ``dropin_dirs`` overrides the drop-in directories
    (``[]`` for none); ``env`` replaces ``os.environ`` (tests).
    """
    e = os.environ if env is None else env
    home = Path(e.get("HOME", "~")).expanduser()
    user_conf = home / ".config" / "containers" / "registries.conf"
    if path is not None:
        main = Path(path)
    elif e.get("CONTAINERS_REGISTRIES_CONF"):
        main = Path(e["CONTAINERS_REGISTRIES_CONF"])
    elif user_conf.exists():
        main = user_conf
    else:
        main = SYSTEM_CONF
    if dropin_dirs is None:
        dropin_dirs = [SYSTEM_DROPIN_DIR, home / ".config" / "containers" / "registries.conf.d"]
    partial = _Partial()
    files: list[str] = []
    explicit = path is not None or bool(e.get("CONTAINERS_REGISTRIES_CONF"))
    if main.exists():
        _parse_file(main, partial)
        files.append(str(main))
    elif explicit:
        raise ConfigError(f"{main}: registries.conf does not exist")
    for p in _dropins(dropin_dirs):
        _parse_file(p, partial)
        files.append(str(p))
    return RegistriesConf(
        tuple(partial.registries.values()),
        partial.search or (),
        partial.helper,
        tuple(files),
    )


def parse_registries_conf_text(text: str, source: str = "registries.conf") -> RegistriesConf:
    """Parse one file's text alone, without drop-ins (tests, alsd config snippets)."""
    partial = _Partial()
    _parse_text(text, source, partial)
    return RegistriesConf(
        tuple(partial.registries.values()), partial.search or (), partial.helper, (source,)
    )


def reference_endpoints(conf: RegistriesConf, ref: str | Reference) -> list[Endpoint]:
    """Convenience: endpoints of a reference string or :class:`Reference`."""
    return conf.endpoints(parse_reference(ref) if isinstance(ref, str) else ref)
