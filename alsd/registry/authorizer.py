"""Registry authentication: the ``Authorization`` header of each request.

Follows containerd: a 401's ``WWW-Authenticate`` challenge says Bearer (token server) or
Basic. Bearer tokens are asked for anonymously or with the credentials of the
registry/repository (POST with a form first, GET with Basic credentials as the fallback),
cached per (host, scope) until ``expires_in`` (renewed a little early), and dropped on
a 401. Token fetches are serialised per (host, scope), so N concurrent 401s cost one
token request. Token requests go through the :class:`~alsd.registry.transport.Transport`
like every request (retries, deadline), without auth and without following redirects.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from yarl import URL

from alsd.counters import ByteCounter
from alsd.errors import RegistryError, Unauthorized
from alsd.oci.auth import (
    Challenge,
    Credentials,
    basic_authorization,
    parse_token_response,
    parse_www_authenticate,
    token_request,
)
from alsd.oci.reference import Reference
from alsd.registry.authfile import CredentialSource
from alsd.registry.regconf import Endpoint
from alsd.registry.transport import Attempt, Transport

# The longest token response read.
_MAX_TOKEN_BYTES = 1 << 20


class Authorizer:
    """Implements :class:`~alsd.registry.transport.AuthSource` for a transport."""

    def __init__(self, transport: Transport, credentials: CredentialSource | None) -> None:
        self._transport = transport
        self.credentials = credentials
        self._challenges: dict[str, Challenge] = {}  # host -> its last challenge
        self._basic: dict[str, str] = {}  # host -> Basic header
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def _credentials_for(self, ep: Endpoint) -> Credentials | None:
        if self.credentials is None:
            return None
        return await self.credentials.lookup(ep.registry, ep.repository)

    async def header(
        self, ep: Endpoint, ref: Reference, scope: str, counter: ByteCounter | None, att: Attempt
    ) -> str | None:
        ch = self._challenges.get(ep.host)
        if ch is None:
            return None
        if ch.scheme == "basic":
            return self._basic.get(ep.host)
        key = (ep.host, scope)
        cached = self._tokens.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached[1] > time.monotonic():
                return f"Bearer {cached[0]}"
            token, expires_in = await self._fetch_token(ep, ref, ch, scope, counter, att)
            # Renew a little early so that a token does not expire in flight.
            margin = min(10.0, expires_in / 4)
            self._tokens[key] = (token, time.monotonic() + expires_in - margin)
            return f"Bearer {token}"

    async def on_401(
        self,
        ep: Endpoint,
        ref: Reference,
        scope: str,
        resp: aiohttp.ClientResponse,
        counter: ByteCounter | None,
        att: Attempt,
    ) -> None:
        challenges = parse_www_authenticate(resp.headers.getall("WWW-Authenticate", []))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            raise Unauthorized(
                f"{ref}: {ep.host} answered 401 without a usable challenge "
                f"({', '.join(c.scheme for c in challenges) or 'none'})"
            )
        ch = usable[0]
        self._challenges[ep.host] = ch
        self._tokens.pop((ep.host, scope), None)  # whatever we had is no good any more
        if ch.scheme == "basic":
            creds = await self._credentials_for(ep)
            if creds is None or not creds.secret:
                raise Unauthorized(
                    f"{ref}: {ep.host} requires credentials (Basic) and none were found "
                    f"for {ep.registry}/{ep.repository}"
                )
            self._basic[ep.host] = basic_authorization(creds)

    async def _fetch_token(
        self,
        ep: Endpoint,
        ref: Reference,
        ch: Challenge,
        scope: str,
        counter: ByteCounter | None,
        att: Attempt,
    ) -> tuple[str, float]:
        tr = self._transport
        # ``scope`` may hold several space-separated scopes (the pusher asks for two repos).
        req = token_request(ch, scope.split())
        creds = await self._credentials_for(ep)
        realm = URL(req.realm)
        if realm.scheme not in ("http", "https") or not realm.host:
            raise Unauthorized(f"{ref}: {ep.host} sent a bad token realm {req.realm!r}")
        # The token server is its own host; treat it as a plain endpoint without auth.
        realm_ep = Endpoint(ep.registry, realm.host_port_subcomponent or "", realm.scheme, "")
        what = f"token from {realm.host}"
        label = f"token server {realm_ep.host}"

        async def read_token(resp: aiohttp.ClientResponse) -> tuple[str, float] | None:
            if resp.status == 200:
                body = await tr.read_body(resp, counter, _MAX_TOKEN_BYTES, ref, realm_ep)
                try:
                    tok = parse_token_response(body)
                except RegistryError as exc:
                    raise RegistryError(f"{ref}: {what}: {exc}") from exc
                return tok.token, tok.expires_in_s
            return None

        if creds is not None and creds.secret:

            async def post(resp: aiohttp.ClientResponse) -> tuple[str, float] | None:
                got = await read_token(resp)
                if got is None:
                    if resp.status in (400, 401, 404, 405):
                        await tr.drain(resp, counter)
                        return None  # containerd falls back to GET for these
                    await tr.raise_status(resp, ref, realm_ep, what, counter)
                return got

            got = await tr.call(
                realm_ep, ref, "POST", req.realm, post, counter, att,
                data=req.post_form(creds), auth=False, follow_redirects=False, label=label,
                encoded_url=True,
            )  # fmt: skip
            if got is not None:
                return got

        async def get(resp: aiohttp.ClientResponse) -> tuple[str, float] | None:
            got = await read_token(resp)
            if got is None:
                if resp.status in (401, 403):
                    await tr.drain(resp, counter)
                    who = "anonymous" if creds is None else f"user {creds.username or '<token>'}"
                    raise Unauthorized(
                        f"{ref}: token server {realm.host} refused {who} for {scope} "
                        f"(HTTP {resp.status})"
                    )
                await tr.raise_status(resp, ref, realm_ep, what, counter)
            return got

        headers = {}
        if creds is not None and creds.secret:
            headers["Authorization"] = basic_authorization(creds)
        got = await tr.call(
            realm_ep, ref, "GET", str(realm.update_query(req.get_params())), get, counter, att,
            headers=headers, auth=False, follow_redirects=False, label=label, encoded_url=True,
        )  # fmt: skip
        if got is None:
            raise Unauthorized(f"{ref}: no token from {realm.host}")
        return got
