"""Registry credentials, looked up the way containers/image does (spec.md §2.8).

Sources, first hit wins:

1. credentials podman ≥ 5.2 handed over through ``additional-layer-store-auth-helper``
   (kept in memory only, :class:`HelperCredentials`);
2. auth files in order: an explicit path if given (it replaces the search list), else
   ``${XDG_RUNTIME_DIR}/containers/auth.json`` (``/run/containers/<uid>/auth.json`` when
   unset), ``${XDG_CONFIG_HOME:-$HOME/.config}/containers/auth.json``,
   ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, ``~/.dockercfg``.
   In each file: ``credHelpers[registry]`` (run ``docker-credential-NAME get``), then
   ``auths`` keys from most to least specific (``host/ns/repo`` … ``host``), then
   ``credsStore``.

Keys are normalised: ``http(s)://`` and the path after the host are stripped from
legacy keys, and ``docker.io``/``registry-1.docker.io`` become ``index.docker.io``.

Concurrency: :meth:`CredentialStore.lookup` is async only because a credential helper
is a subprocess; files are re-read on each lookup (they are small, and podman login
may change them while the daemon runs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from alsd.errors import ConfigError
from alsd.oci.auth import Credentials
from alsd.oci.reference import InvalidReference, parse_reference

_HUB_KEYS = frozenset({"docker.io", "registry-1.docker.io"})
HELPER_TIMEOUT_S = 30.0


class CredentialSource(Protocol):
    """What :class:`alsd.registry.client.RegistryClient` asks for credentials."""

    async def lookup(self, registry: str, repository: str) -> Credentials | None: ...


def normalize_registry_key(key: str) -> str:
    """containers/image ``normalizeAuthFileKey`` + ``normalizeRegistry``."""
    stripped = key.removeprefix("http://").removeprefix("https://")
    if stripped != key:
        stripped = stripped.split("/", 1)[0]
    host, sep, rest = stripped.partition("/")
    if host in _HUB_KEYS:
        host = "index.docker.io"
    return host + sep + rest


def auth_keys(registry: str, repository: str) -> list[str]:
    """Keys to try, most specific first: ``host/a/b``, ``host/a``, ``host``."""
    host = normalize_registry_key(registry)
    parts = [p for p in repository.split("/") if p]
    keys = [host + "/" + "/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    keys.append(host)
    return keys


def default_auth_paths(env: Mapping[str, str] | None = None, uid: int | None = None) -> list[Path]:
    e = os.environ if env is None else env
    home = Path(e.get("HOME") or os.path.expanduser("~"))
    paths: list[Path] = []
    if e.get("XDG_RUNTIME_DIR"):
        paths.append(Path(e["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    else:
        paths.append(Path(f"/run/containers/{os.getuid() if uid is None else uid}/auth.json"))
    xdg_config = Path(e["XDG_CONFIG_HOME"]) if e.get("XDG_CONFIG_HOME") else home / ".config"
    paths.append(xdg_config / "containers" / "auth.json")
    if e.get("DOCKER_CONFIG"):
        paths.append(Path(e["DOCKER_CONFIG"]) / "config.json")
    else:
        paths.append(home / ".docker" / "config.json")
    paths.append(home / ".dockercfg")
    return paths


def _decode_entry(entry: Any, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: auths[{key!r}] must be an object")
    auth = entry.get("auth", "")
    token = entry.get("identitytoken", "")
    if not isinstance(auth, str) or not isinstance(token, str):
        raise ConfigError(f"{path}: auths[{key!r}]: 'auth' and 'identitytoken' must be strings")
    user = password = ""
    if auth:
        try:
            raw = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: auths[{key!r}].auth is not base64: {exc}") from exc
        user, sep, password = raw.partition(":")
        if not sep:
            raise ConfigError(f"{path}: auths[{key!r}].auth must encode 'user:password'")
    if not user and not password and not token:
        return None
    return Credentials(user, password, token)


class AuthFile:
    """One parsed auth file (podman's auth.json, docker's config.json or .dockercfg)."""

    def __init__(self, path: Path, doc: Mapping[str, Any], legacy: bool) -> None:
        self.path = path
        self.auths: dict[str, Credentials | None] = {}
        self.cred_helpers: dict[str, str] = {}
        self.creds_store: str | None = None
        raw_auths = doc if legacy else doc.get("auths", {})
        if not isinstance(raw_auths, dict):
            raise ConfigError(f"{path}: key 'auths' must be an object")
        for k, v in raw_auths.items():
            # Every entry is decoded now so that one bad entry is reported at load time.
            self.auths.setdefault(normalize_registry_key(k), _decode_entry(v, path, k))
        if not legacy:
            helpers = doc.get("credHelpers", {})
            if not isinstance(helpers, dict) or not all(
                isinstance(v, str) for v in helpers.values()
            ):
                raise ConfigError(f"{path}: key 'credHelpers' must map registries to names")
            self.cred_helpers = {normalize_registry_key(k): v for k, v in helpers.items()}
            store = doc.get("credsStore")
            if store is not None and not isinstance(store, str):
                raise ConfigError(f"{path}: key 'credsStore' must be a string")
            self.creds_store = store or None

    @classmethod
    def load(cls, path: Path) -> AuthFile | None:
        """Parse ``path``; None if it does not exist; ConfigError naming it if malformed."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read auth file: {exc}") from exc
        if not data.strip():
            return None
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: auth file is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: auth file must hold a JSON object")
        return cls(path, doc, legacy=path.name == ".dockercfg")

    def helper_for(self, registry: str) -> str | None:
        host = normalize_registry_key(registry)
        return self.cred_helpers.get(host)

    def find(self, registry: str, repository: str) -> Credentials | None:
        for key in auth_keys(registry, repository):
            if key in self.auths:
                return self.auths[key]
        return None


async def run_credential_helper(
    name: str, registry: str, *, timeout_s: float = HELPER_TIMEOUT_S
) -> Credentials | None:
    """``docker-credential-NAME get`` with the server on stdin; None if it has nothing.

    docker.io's helper key is ``https://index.docker.io/v1/`` by docker convention.
    """
    server = normalize_registry_key(registry)
    if server == "index.docker.io":
        server = "https://index.docker.io/v1/"
    prog = f"docker-credential-{name}"
    try:
        proc = await asyncio.create_subprocess_exec(
            prog,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ConfigError(f"credential helper {prog} for {registry}: cannot run: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(server.encode()), timeout_s)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise ConfigError(f"credential helper {prog} for {registry}: timed out") from exc
    if proc.returncode != 0:
        msg = (out or err).decode(errors="replace").strip()
        if "credentials not found" in msg.lower():
            return None
        raise ConfigError(
            f"credential helper {prog} for {registry} failed ({proc.returncode}): {msg}"
        )
    try:
        doc = json.loads(out)
        user, secret = doc.get("Username", ""), doc.get("Secret", "")
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"credential helper {prog} for {registry}: bad JSON: {exc}") from exc
    if not isinstance(user, str) or not isinstance(secret, str):
        raise ConfigError(f"credential helper {prog} for {registry}: bad JSON fields")
    if user == "<token>":  # docker's convention for an identity token
        return Credentials("", "", secret)
    return Credentials(user, secret)


def parse_helper_json(data: bytes | str) -> dict[tuple[str, str], Credentials]:
    """Parse podman's ``additional-layer-store-auth-helper`` stdin.

    ``{"<image ref>": {"username": …, "password": …, "identityToken": …}}`` →
    ``{(registry, repository): Credentials}``. Raises :class:`ConfigError`.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"auth helper input is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError("auth helper input must be a JSON object")
    out: dict[tuple[str, str], Credentials] = {}
    for ref_text, entry in doc.items():
        try:
            ref = parse_reference(ref_text)
        except InvalidReference as exc:
            raise ConfigError(f"auth helper input: {exc}") from exc
        if not isinstance(entry, dict):
            raise ConfigError(f"auth helper input: entry for {ref_text!r} must be an object")
        fields = {k: entry.get(k, "") for k in ("username", "password", "identityToken")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise ConfigError(f"auth helper input: fields of {ref_text!r} must be strings")
        out[(ref.registry, ref.repository)] = Credentials(
            fields["username"], fields["password"], fields["identityToken"]
        )
    return out


class HelperCredentials:
    """In-memory credentials from podman's auth helper; never written to disk."""

    def __init__(self) -> None:
        self._by_repo: dict[tuple[str, str], Credentials] = {}

    def add(self, creds: Mapping[tuple[str, str], Credentials]) -> None:
        self._by_repo.update(creds)

    def add_json(self, data: bytes | str) -> int:
        parsed = parse_helper_json(data)
        self.add(parsed)
        return len(parsed)

    def clear(self) -> None:
        self._by_repo.clear()

    def __len__(self) -> int:
        return len(self._by_repo)

    def find(self, registry: str, repository: str) -> Credentials | None:
        """Exact repository first, then any credentials for the same registry."""
        reg = normalize_registry_key(registry)
        exact = None
        same_host = None
        for (r, repo), c in self._by_repo.items():
            if normalize_registry_key(r) != reg:
                continue
            if repo == repository:
                exact = c
            elif same_host is None:
                same_host = c
        return exact or same_host


class CredentialStore:
    """All credential sources in podman's order; a :class:`CredentialSource`."""

    def __init__(
        self,
        auth_files: Sequence[Path] | None = None,
        *,
        helper: HelperCredentials | None = None,
        env: Mapping[str, str] | None = None,
        helper_timeout_s: float = HELPER_TIMEOUT_S,
    ) -> None:
        self.paths = list(auth_files) if auth_files is not None else default_auth_paths(env)
        self.helper = helper if helper is not None else HelperCredentials()
        self.helper_timeout_s = helper_timeout_s

    async def lookup(self, registry: str, repository: str) -> Credentials | None:
        found = self.helper.find(registry, repository)
        if found is not None:
            return found
        store: str | None = None
        for path in self.paths:
            f = AuthFile.load(path)
            if f is None:
                continue
            name = f.helper_for(registry)
            if name:
                return await run_credential_helper(name, registry, timeout_s=self.helper_timeout_s)
            creds = f.find(registry, repository)
            if creds is not None:
                return creds
            store = store or f.creds_store
        if store:
            return await run_credential_helper(store, registry, timeout_s=self.helper_timeout_s)
        return None

    def check(self) -> None:
        """Parse every auth file now, so a malformed one is reported at start-up."""
        for path in self.paths:
            AuthFile.load(path)
