"""WWW-Authenticate parsing, token requests and token responses."""

from __future__ import annotations

import base64
import json

import pytest

from alsd.errors import RegistryError
from alsd.oci.auth import (
    Challenge,
    Credentials,
    basic_authorization,
    parse_token_response,
    parse_www_authenticate,
    repository_scope,
    token_request,
)

HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/ubuntu:pull"'
)


def simple(chs: list[Challenge]) -> list[tuple[str, dict[str, str]]]:
    return [(c.scheme, dict(c.params)) for c in chs]


@pytest.mark.parametrize(
    ("headers", "want"),
    [
        ([HUB], [("bearer", {"realm": "https://auth.docker.io/token",
                             "service": "registry.docker.io",
                             "scope": "repository:library/ubuntu:pull"})]),
        (['Basic realm="Registry Realm"'], [("basic", {"realm": "Registry Realm"})]),
        (["BASIC Realm=x"], [("basic", {"realm": "x"})]),
        # Escapes inside quoted strings, and commas inside them.
        ([r'Bearer realm="a\"b\\c",scope="x,y"'],
         [("bearer", {"realm": 'a"b\\c', "scope": "x,y"})]),
        # Unquoted URL values, spaces around "=".
        (["Bearer realm = https://h/t?x=1 , service=s"],
         [("bearer", {"realm": "https://h/t?x=1", "service": "s"})]),
        # Several challenges in one header and across headers: Bearer > Digest > Basic.
        (['Basic realm="b", Bearer realm="t"', 'Digest realm="d", nonce="n"'],
         [("bearer", {"realm": "t"}), ("digest", {"realm": "d", "nonce": "n"}),
          ("basic", {"realm": "b"})]),
        (["Negotiate"], [("negotiate", {})]),
        ([], []),
    ],
)  # fmt: skip
def test_parse(headers: list[str], want: list[tuple[str, dict[str, str]]]) -> None:
    assert simple(parse_www_authenticate(headers)) == want


def test_parse_bad() -> None:
    with pytest.raises(RegistryError, match="malformed WWW-Authenticate"):
        parse_www_authenticate(['Bearer realm="unterminated'])
    with pytest.raises(RegistryError):
        parse_www_authenticate(["@@@"])


def test_token_request_scopes_and_flows() -> None:
    (ch,) = parse_www_authenticate([HUB])
    req = token_request(
        ch, [repository_scope("library/ubuntu"), repository_scope("a/b", ("pull", "push"))]
    )
    assert req.realm == "https://auth.docker.io/token"
    assert req.scopes == ("repository:a/b:pull,push", "repository:library/ubuntu:pull")
    assert req.get_params() == [
        ("service", "registry.docker.io"),
        ("scope", "repository:a/b:pull,push"),
        ("scope", "repository:library/ubuntu:pull"),
    ]
    form = req.post_form(Credentials("u", "p"))
    assert form["grant_type"] == "password" and form["username"] == "u" and form["password"] == "p"
    assert form["scope"] == "repository:a/b:pull,push repository:library/ubuntu:pull"
    assert form["service"] == "registry.docker.io" and form["client_id"]
    refresh = req.post_form(Credentials("u", "p", identity_token="idt"))
    assert refresh["grant_type"] == "refresh_token" and refresh["refresh_token"] == "idt"
    assert "password" not in refresh


def test_token_request_needs_realm() -> None:
    with pytest.raises(RegistryError, match="realm"):
        token_request(Challenge("bearer", {}))
    with pytest.raises(ValueError):
        token_request(Challenge("basic", {"realm": "x"}))


@pytest.mark.parametrize(
    ("doc", "token", "expires"),
    [
        ({"token": "tok-T"}, "tok-T", 60.0),
        ({"access_token": "tok-A", "token": "tok-T", "expires_in": 300}, "tok-A", 300.0),
        ({"token": "tok-T", "expires_in": 0}, "tok-T", 60.0),
        ({"token": "tok-T", "expires_in": "300"}, "tok-T", 60.0),
        ({"token": "tok-T", "expires_in": 1.5}, "tok-T", 1.5),
    ],
)
def test_token_response(doc: dict[str, object], token: str, expires: float) -> None:
    tok = parse_token_response(json.dumps(doc).encode())
    assert (tok.token, tok.expires_in_s) == (token, expires)
    assert token not in repr(tok)


@pytest.mark.parametrize("body", [b"", b"[]", b'{"token": ""}', b'{"expires_in": 5}', b"<html>"])
def test_token_response_bad(body: bytes) -> None:
    with pytest.raises(RegistryError):
        parse_token_response(body)


def test_basic_and_repr() -> None:
    c = Credentials("user", "p:ss")
    assert basic_authorization(c) == "Basic " + base64.b64encode(b"user:p:ss").decode()
    assert "p:ss" not in repr(c)
    assert Credentials("", "", "idt").secret == "idt"
