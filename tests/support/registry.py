"""Run Debian's real ``docker-registry`` (distribution 2.8) for tests, optionally with auth.

Fixtures (put ``pytest_plugins = ["tests.support.registry"]`` in your test module, or
import the ones you use: ``from tests.support.registry import registry  # noqa: F401``).
The registry's storage root is ``RegistryServer.workdir / "storage"``:

``registry``
    Session-scoped, anonymous registry on 127.0.0.1 with a free port and tmp storage.
    A :class:`RegistryServer`: ``.host`` ("127.0.0.1"), ``.port``, ``.address``
    ("127.0.0.1:PORT"), ``.url`` ("http://127.0.0.1:PORT"), ``.push_fixture(tag,
    repo="fx")`` → reference string "127.0.0.1:PORT/fx:TAG" (pushed once per session with
    ``skopeo copy --preserve-digests`` from the fixture OCI layout),
    ``.write_registries_conf(path)`` (marks it ``insecure``), ``.stop()``.
``registry_htpasswd``
    Session-scoped registry with ``auth.htpasswd`` (basic auth). ``.username`` /
    ``.password``; ``.write_auth_json(path)`` writes a podman auth.json for it.
``registry_token``
    Session-scoped registry with ``auth.token``: bearer tokens from a :class:`TokenServer`
    this module runs (RS256 JWTs signed with a self-signed certificate made by the
    ``openssl`` CLI, ``x5c`` header). Anonymous pulls get a pull-only token; the user
    gets pull+push. ``.token_server.requests`` records what the token server was asked.
``start_registry(workdir, auth=None|"htpasswd"|"token", ...)``
    Start one yourself (function-scoped uses); always ``stop()`` it.

Fixture image helpers: :func:`fixture_manifest` reads a tag's manifest bytes and digest
from the OCI layout's index.json; :func:`fixture_blob_path` gives a blob's file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fixtures_dir

READY_TIMEOUT_S = 30.0
TOKEN_SERVICE = "alsd-test-registry"
TOKEN_ISSUER = "alsd-test-issuer"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fixture_manifest(tag: str) -> tuple[str, bytes]:
    """(digest, bytes) of the manifest that the fixture layout's index.json names ``tag``."""
    images = fixtures_dir() / "images"
    index = json.loads((images / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest: str = desc["digest"]
            return digest, fixture_blob_path(digest).read_bytes()
    raise KeyError(f"fixture tag {tag!r} not in {images}/index.json")


def fixture_blob_path(digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return fixtures_dir() / "images" / "blobs" / algo / hexpart


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """A minimal Docker token server (the ``auth.token`` flow), test-only.

    GET ``/token?service=&scope=`` (HTTP Basic optional) and POST form (OAuth2
    ``grant_type=password``). Tokens are RS256 JWTs carrying the certificate in ``x5c``
    so that distribution verifies them against ``rootcertbundle``.
    """

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        *,
        allow_anonymous: bool = True,
        expires_in_s: int | None = 300,
    ) -> None:
        self.workdir = workdir
        self.users = users
        self.allow_anonymous = allow_anonymous
        self.expires_in_s = expires_in_s
        self.requests: list[dict[str, Any]] = []
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
             "-keyout", str(self.key), "-out", str(self.cert), "-days", "3",
             "-subj", "/CN=alsd-test-token"],
            check=True, capture_output=True,
        )  # fmt: skip
        pem = self.cert.read_text()
        body = "".join(line for line in pem.splitlines() if line and not line.startswith("-----"))
        self._x5c = body  # standard base64 of the DER certificate, as JWS x5c wants
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                outer._answer(self, "GET", q, self.headers.get("Authorization"))

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(n).decode())
                outer._answer(self, "POST", form, self.headers.get("Authorization"))

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return signing_input + "." + _b64url(sig)

    def _user(self, method: str, q: dict[str, list[str]], authz: str | None) -> str | None:
        """The authenticated user, "" for anonymous, None for bad credentials."""
        if method == "POST":
            grant = q.get("grant_type", [""])[0]
            if grant != "password":
                return None
            user, pw = q.get("username", [""])[0], q.get("password", [""])[0]
            return user if self.users.get(user) == pw else None
        if authz and authz.startswith("Basic "):
            user, _, pw = base64.b64decode(authz[6:]).decode().partition(":")
            return user if self.users.get(user) == pw else None
        return ""

    def _answer(
        self, h: BaseHTTPRequestHandler, method: str, q: dict[str, list[str]], authz: str | None
    ) -> None:
        user = self._user(method, q, authz)
        scopes: list[str] = []
        for s in q.get("scope", []):
            scopes.extend(s.split())
        with self._lock:
            self.requests.append({"method": method, "user": user, "scopes": scopes})
        if user is None or (user == "" and not self.allow_anonymous):
            h.send_response(401)
            h.send_header("Content-Type", "application/json")
            h.end_headers()
            h.wfile.write(b'{"details":"bad credentials"}')
            return
        access = []
        for s in scopes:
            typ, _, rest = s.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            allowed = [a for a in wanted if a == "pull" or (user and a in ("push", "*"))]
            access.append({"type": typ, "name": name, "actions": allowed})
        now = int(time.time())
        token = self._sign({
            "iss": TOKEN_ISSUER, "sub": user or "anonymous", "aud": TOKEN_SERVICE,
            "exp": now + 3600, "nbf": now - 60, "iat": now, "jti": uuid.uuid4().hex,
            "access": access,
        })  # fmt: skip
        doc: dict[str, Any] = {"token": token} if method == "GET" else {"access_token": token}
        if self.expires_in_s is not None:
            doc["expires_in"] = self.expires_in_s
        body = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class RegistryServer:
    workdir: Path
    port: int
    proc: subprocess.Popen[bytes]
    auth: str | None = None
    username: str = ""
    password: str = ""
    token_server: TokenServer | None = None
    host: str = "127.0.0.1"
    scheme: str = "http"
    _pushed: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.workdir / "registry.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def push_fixture(self, tag: str, repo: str = "fx") -> str:
        """Push fixture ``tag`` to ``repo:tag`` (once) and return the reference string."""
        key = (repo, tag)
        if key in self._pushed:
            return self._pushed[key]
        ref = f"{self.address}/{repo}:{tag}"
        cmd = [
            "skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
            f"oci:{fixtures_dir() / 'images'}:{tag}", f"docker://{ref}",
        ]  # fmt: skip
        if self.auth:
            cmd[2:2] = ["--dest-creds", f"{self.username}:{self.password}"]
        env = dict(os.environ)
        # skopeo must not pick up credentials or mirrors of the machine running the tests.
        with tempfile.TemporaryDirectory() as d:
            empty_auth = Path(d) / "auth.json"
            empty_auth.write_text('{"auths": {}}')
            env["REGISTRY_AUTH_FILE"] = str(empty_auth)
            regconf = Path(d) / "registries.conf"
            self.write_registries_conf(regconf)
            env["CONTAINERS_REGISTRIES_CONF"] = str(regconf)
            r = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed: {r.stderr.decode(errors='replace')}\n{self.log_tail()}"
            )
        self._pushed[key] = ref
        return ref

    def write_registries_conf(self, path: Path, *, mirrors: tuple[str, ...] = ()) -> Path:
        lines = ["[[registry]]", f'location = "{self.address}"', "insecure = true"]
        for m in mirrors:
            lines += ["[[registry.mirror]]", f'location = "{m}"', "insecure = true"]
        path.write_text("\n".join(lines) + "\n")
        return path

    def write_auth_json(self, path: Path) -> Path:
        auth = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.address: {"auth": auth}}}))
        return path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.token_server is not None:
            self.token_server.stop()


def _wait_ready(server: RegistryServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        try:
            # A TLS registry's certificate names another host: readiness only.
            ctx = ssl._create_unverified_context() if server.scheme == "https" else None
            with urllib.request.urlopen(server.url + "/v2/", timeout=2, context=ctx) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # auth-enabled registries answer /v2/ with a challenge
                return
            last = exc
        except OSError as exc:
            last = exc
        # Poll interval while the server starts (not a timed assertion).
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"docker-registry not ready after {READY_TIMEOUT_S}s: {last}")


def start_registry(
    workdir: Path,
    *,
    auth: str | None = None,
    username: str = "alsd",
    password: str = "s3cret pass",
    allow_anonymous: bool = True,
    token_expires_in_s: int | None = 300,
    proxy_remote_url: str | None = None,
    tls: tuple[Path, Path] | None = None,
) -> RegistryServer:
    """Start a registry under ``workdir`` (which must exist and be empty).

    ``proxy_remote_url`` makes it a pull-through cache of that registry (distribution's
    ``proxy: remoteurl:``; it then refuses pushes). ``tls`` (certificate, key) makes it
    serve HTTPS."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed")
    port = free_port()
    config: list[str] = [
        "version: 0.1",
        "log: {level: warn, accesslog: {disabled: true}}",
        "storage:",
        f"  filesystem: {{rootdirectory: {json.dumps(str(workdir / 'storage'))}}}",
        "  delete: {enabled: true}",
    ]
    if tls is None:
        config.append(f"http: {{addr: '127.0.0.1:{port}'}}")
    else:
        cert, key = (json.dumps(str(p)) for p in tls)
        config.append(
            f"http: {{addr: '127.0.0.1:{port}', tls: {{certificate: {cert}, key: {key}}}}}"
        )
    token_server: TokenServer | None = None
    if auth == "htpasswd":
        out = subprocess.run(
            ["htpasswd", "-Bbn", username, password], check=True, capture_output=True
        ).stdout
        (workdir / "htpasswd").write_bytes(out)
        config += [
            "auth:",
            "  htpasswd:",
            "    realm: alsd-test",
            f"    path: {json.dumps(str(workdir / 'htpasswd'))}",
        ]
    elif auth == "token":
        token_server = TokenServer(
            workdir,
            {username: password},
            allow_anonymous=allow_anonymous,
            expires_in_s=token_expires_in_s,
        )
        config += [
            "auth:",
            "  token:",
            f"    realm: {token_server.realm}",
            f"    service: {TOKEN_SERVICE}",
            f"    issuer: {TOKEN_ISSUER}",
            f"    rootcertbundle: {json.dumps(str(token_server.cert))}",
        ]
    elif auth is not None:
        raise ValueError(f"unknown auth {auth!r}")
    if proxy_remote_url is not None:
        config += ["proxy:", f"  remoteurl: {json.dumps(proxy_remote_url)}"]
    cfg = workdir / "config.yml"
    cfg.write_text("\n".join(config) + "\n")
    log = (workdir / "registry.log").open("wb")
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    server = RegistryServer(workdir, port, proc, auth, username, password, token_server)
    if tls is not None:
        server.scheme = "https"
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_registry(workdir: Path, **kwargs: Any) -> Iterator[RegistryServer]:
    server = start_registry(workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture(scope="session")
def registry_htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with running_registry(tmp_path_factory.mktemp("registry-htpasswd"), auth="htpasswd") as r:
        yield r


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with running_registry(tmp_path_factory.mktemp("registry-token"), auth="token") as r:
        yield r
