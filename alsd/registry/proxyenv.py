"""HTTP(S) proxies from the environment, chosen the way podman (Go's net/http) chooses them.

``HTTPS_PROXY`` for https:// URLs, ``HTTP_PROXY`` for http:// URLs, ``NO_PROXY`` for the
hosts reached directly; each also in lower case (the upper-case one wins when both are
set, as in Go). Like Go, ``localhost`` and loopback addresses never go through a proxy.

``NO_PROXY`` is a comma-separated list: ``*`` (no proxy at all), an IP address or a CIDR
block, or a host name: ``example.com`` matches that host and its subdomains,
``.example.com`` and ``*.example.com`` only the subdomains; any entry may end in ``:PORT``
to match only that port (the URL's port, 443/80 by default).

A proxy URL without a scheme means ``http://``; ``http://`` and ``https://`` proxies are
supported (``socks5://`` is not: :func:`load` raises ConfigError naming the variable).
Credentials in the proxy URL (``http://user:pass@proxy:3128``) are sent to the proxy.

Pure: the environment is passed in; nothing here opens a connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from alsd.errors import ConfigError

VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")
_DEFAULT_PORT = {"https": 443, "http": 80}


@dataclass(frozen=True, slots=True)
class Proxy:
    url: str  # scheme://host:port, without credentials
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class _NoProxyEntry:
    host: str = ""  # a name: ".example.com" (suffix); or "" for an address entry
    match_host: bool = False  # the name without the leading dot matches too
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def matches(self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                port: int) -> bool:  # fmt: skip
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip in self.network
        return host.endswith(self.host) or (self.match_host and host == self.host[1:])


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    https: Proxy | None = None
    http: Proxy | None = None
    no_proxy_all: bool = False
    no_proxy: tuple[_NoProxyEntry, ...] = ()

    def proxy_for(self, url: str) -> Proxy | None:
        """The proxy to reach ``url`` through, or None for a direct connection."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None or self.no_proxy_all:
            return None
        host = (parts.hostname or "").lower()
        if not host or host == "localhost":
            return None
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and ip.is_loopback:
            return None
        port = parts.port or _DEFAULT_PORT.get(scheme, 0)
        if any(e.matches(host, ip, port) for e in self.no_proxy):
            return None
        return proxy


def _get(env: Mapping[str, str], name: str) -> tuple[str, str]:
    """(variable name, value) of the first non-empty of NAME and name."""
    for var in (name, name.lower()):
        value = env.get(var, "").strip()
        if value:
            return var, value
    return name, ""


def _proxy(var: str, value: str) -> Proxy | None:
    if not value:
        return None
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"{var}={value}: proxy scheme {scheme!r} is not supported (http:// or https://)"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{var}={value}: not a valid proxy URL (bad port)") from None
    if not parts.hostname:
        raise ConfigError(f"{var}={value}: not a valid proxy URL (no host)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    url = f"{scheme}://{host}" + (f":{port}" if port else "")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return Proxy(url, user, password)


def _no_proxy_entry(item: str) -> _NoProxyEntry | None:
    item = item.strip().lower()
    if not item:
        return None
    try:
        return _NoProxyEntry(network=ipaddress.ip_network(item, strict=False))
    except ValueError:
        pass
    host, port = item, None
    if item.startswith("["):  # [IPv6]:port
        end = item.find("]")
        host, rest = item[1:end], item[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    elif item.count(":") == 1:
        name, _, p = item.partition(":")
        if p.isdigit():
            host, port = name, int(p)
    try:
        return _NoProxyEntry(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    if host.startswith("*."):
        return _NoProxyEntry(host=host[1:], port=port)
    if host.startswith("."):
        return _NoProxyEntry(host=host, port=port)
    return _NoProxyEntry(host="." + host, match_host=True, port=port)


def load(env: Mapping[str, str]) -> ProxyConfig:
    """The proxy configuration of the environment ``env`` (os.environ in the daemon)."""
    https = _proxy(*_get(env, "HTTPS_PROXY"))
    http = _proxy(*_get(env, "HTTP_PROXY"))
    _, no_proxy = _get(env, "NO_PROXY")
    items = [i.strip() for i in no_proxy.split(",")]
    entries = tuple(e for e in map(_no_proxy_entry, items) if e is not None)
    return ProxyConfig(https, http, "*" in items, entries)
