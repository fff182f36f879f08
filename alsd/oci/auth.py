"""Registry authentication, sans-I/O: challenges, token requests, token responses.

Follows containerd's authorizer (spec.md §5.2): ``WWW-Authenticate`` is parsed into
challenges (scheme and parameter names lower-cased, quoted values with ``\\`` escapes),
sorted Bearer > Digest > Basic; a Bearer challenge plus credentials becomes a token
request (POST form or GET query); a token response becomes a :class:`Token`
(``expires_in`` defaults to 60 s, per the Docker token spec). Pure: no I/O.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from alsd.errors import RegistryError

DEFAULT_EXPIRES_IN_S = 60
CLIENT_ID = "alsd"

_SCHEME_ORDER = {"bearer": 0, "digest": 1, "basic": 2}
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What an auth file, a credential helper or podman's ALS auth helper gives us.

    An ``identity_token`` is an OAuth2 refresh token; it wins over the password.
    """

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:  # never print secrets into logs
        state = "set" if self.secret else "none"
        return f"Credentials(username={self.username!r}, secret=<{state}>)"

    @property
    def secret(self) -> str:
        return self.identity_token or self.password


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-case: "bearer", "basic", "digest", ...
    params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


class _Scanner:
    def __init__(self, s: str) -> None:
        self.s = s
        self.i = 0

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _TOKEN_CHARS:
            self.i += 1
        return self.s[start : self.i]

    def bare_value(self) -> str:
        # Registries in the wild send unquoted realms and scopes ("realm=https://x/y").
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in " \t,":
            self.i += 1
        return self.s[start : self.i]

    def quoted(self) -> str:
        assert self.peek() == '"'
        self.i += 1
        out: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            self.i += 1
            if c == "\\" and self.i < len(self.s):
                out.append(self.s[self.i])
                self.i += 1
            elif c == '"':
                return "".join(out)
            else:
                out.append(c)
        raise ValueError("unterminated quoted string")


def _parse_one_header(value: str) -> list[Challenge]:
    """Parse one header value; it may hold several challenges (RFC 9110 §11.6.1)."""
    sc = _Scanner(value)
    challenges: list[Challenge] = []
    scheme: str | None = None
    params: dict[str, str] = {}
    while True:
        sc.skip_ws()
        while sc.peek() == ",":
            sc.i += 1
            sc.skip_ws()
        if not sc.peek():
            break
        tok = sc.token()
        if not tok:
            raise ValueError(f"unexpected character {sc.peek()!r} at {sc.i}")
        sc.skip_ws()
        if sc.peek() == "=" and scheme is not None:
            sc.i += 1
            sc.skip_ws()
            params[tok.lower()] = sc.quoted() if sc.peek() == '"' else sc.bare_value()
            continue
        # A token not followed by "=" starts a new challenge.
        if scheme is not None:
            challenges.append(Challenge(scheme, MappingProxyType(params)))
        scheme, params = tok.lower(), {}
    if scheme is not None:
        challenges.append(Challenge(scheme, MappingProxyType(params)))
    return challenges


def parse_www_authenticate(headers: Iterable[str]) -> list[Challenge]:
    """Every challenge of every ``WWW-Authenticate`` header, Bearer > Digest > Basic.

    Raises :class:`RegistryError` on an unparsable header.
    """
    out: list[Challenge] = []
    for h in headers:
        try:
            out.extend(_parse_one_header(h))
        except ValueError as exc:
            raise RegistryError(f"malformed WWW-Authenticate header {h!r}: {exc}") from exc
    return sorted(out, key=lambda c: _SCHEME_ORDER.get(c.scheme, 3))


def repository_scope(repository: str, actions: Sequence[str] = ("pull",)) -> str:
    return f"repository:{repository}:{','.join(actions)}"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    realm: str
    service: str | None
    scopes: tuple[str, ...]  # sorted, deduplicated

    def get_params(self) -> list[tuple[str, str]]:
        """Query parameters of the GET flow (anonymous, or Basic-authenticated)."""
        q: list[tuple[str, str]] = []
        if self.service:
            q.append(("service", self.service))
        q.extend(("scope", s) for s in self.scopes)
        return q

    def post_form(self, creds: Credentials) -> dict[str, str]:
        """Form of the OAuth2 POST flow (needs a secret)."""
        form: dict[str, str] = {"client_id": CLIENT_ID}
        if self.service:
            form["service"] = self.service
        if self.scopes:
            form["scope"] = " ".join(self.scopes)
        if creds.identity_token or not creds.username:
            form["grant_type"] = "refresh_token"
            form["refresh_token"] = creds.secret
        else:
            form["grant_type"] = "password"
            form["username"] = creds.username
            form["password"] = creds.password
        return form


def token_request(challenge: Challenge, scopes: Iterable[str] = ()) -> TokenRequest:
    """The token request for a Bearer challenge: union of challenge and client scopes."""
    if challenge.scheme != "bearer":
        raise ValueError(f"not a bearer challenge: {challenge.scheme}")
    realm = challenge.params.get("realm")
    if not realm:
        raise RegistryError("Bearer challenge without a realm")
    all_scopes = set(scopes)
    if challenge.params.get("scope"):
        all_scopes.update(challenge.params["scope"].split())
    return TokenRequest(realm, challenge.params.get("service") or None, tuple(sorted(all_scopes)))


@dataclass(frozen=True, slots=True)
class Token:
    token: str
    expires_in_s: float
    refresh_token: str | None = None

    def __repr__(self) -> str:
        return f"Token(<secret>, expires_in_s={self.expires_in_s})"


def parse_token_response(body: bytes) -> Token:
    """Parse the JSON a token server answers; ``access_token`` wins over ``token``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"token server answered non-JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RegistryError("token server answered JSON that is not an object")
    tok = doc.get("access_token") or doc.get("token")
    if not isinstance(tok, str) or not tok:
        raise RegistryError("token server answer has no token")
    exp = doc.get("expires_in")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or exp <= 0:
        exp = DEFAULT_EXPIRES_IN_S
    refresh = doc.get("refresh_token")
    return Token(tok, float(exp), refresh if isinstance(refresh, str) and refresh else None)


def basic_authorization(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")
