"""alsd.registry.proxyenv: which proxy a URL goes through, as Go's net/http decides."""

from __future__ import annotations

import pytest

from alsd.errors import ConfigError
from alsd.registry.proxyenv import Proxy, load

P = "http://proxy.example:3128"


def via(env: dict[str, str], url: str) -> str | None:
    proxy = load(env).proxy_for(url)
    return None if proxy is None else proxy.url


def test_nothing_set_means_direct() -> None:
    assert via({}, "https://registry.example/v2/") is None


def test_scheme_picks_the_variable() -> None:
    env = {"HTTPS_PROXY": P, "HTTP_PROXY": "http://other:8080"}
    assert via(env, "https://registry.example/v2/") == P
    assert via(env, "http://registry.example/v2/") == "http://other:8080"
    assert via({"HTTPS_PROXY": P}, "http://registry.example/v2/") is None


def test_lower_case_and_upper_case_wins() -> None:
    assert via({"https_proxy": P}, "https://r.example/") == P
    assert via({"HTTPS_PROXY": P, "https_proxy": "http://low:1"}, "https://r.example/") == P
    assert via({"HTTPS_PROXY": "", "https_proxy": P}, "https://r.example/") == P


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "[::1]"])
def test_loopback_is_never_proxied(host: str) -> None:
    assert via({"HTTP_PROXY": P}, f"http://{host}:5000/v2/") is None


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("*", "https://anything.example/", True),
        ("example.com", "https://example.com/", True),
        ("example.com", "https://r.example.com/", True),
        ("example.com", "https://notexample.com/", False),
        (".example.com", "https://example.com/", False),
        (".example.com", "https://r.example.com/", True),
        ("*.example.com", "https://example.com/", False),
        ("*.example.com", "https://a.b.example.com/", True),
        ("EXAMPLE.com", "https://R.Example.COM/", True),
        ("example.com:5000", "https://example.com:5000/", True),
        ("example.com:5000", "https://example.com/", False),
        ("example.com:443", "https://example.com/", True),
        ("10.0.0.0/8", "https://10.1.2.3:5000/", True),
        ("10.0.0.0/8", "https://11.1.2.3/", False),
        ("192.168.1.5", "https://192.168.1.5/", True),
        ("[2001:db8::1]:443", "https://[2001:db8::1]/", True),
        ("2001:db8::/32", "https://[2001:db8::1]/", True),
        (" a.example , b.example ", "https://b.example/", True),
        ("a.example,,", "https://c.example/", False),
    ],
)
def test_no_proxy(no_proxy: str, url: str, direct: bool) -> None:
    env = {"HTTPS_PROXY": P, "NO_PROXY": no_proxy}
    assert (via(env, url) is None) is direct
    assert (via({"https_proxy": P, "no_proxy": no_proxy}, url) is None) is direct


def test_proxy_url_forms() -> None:
    assert load({"HTTPS_PROXY": "proxy.example:3128"}).https == Proxy("http://proxy.example:3128")
    assert load({"HTTPS_PROXY": "https://proxy.example"}).https == Proxy("https://proxy.example")
    creds = load({"HTTPS_PROXY": "http://us%40er:p%3Ass@proxy.example:3128"}).https
    assert creds == Proxy("http://proxy.example:3128", "us@er", "p:ss")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks5://proxy.example:1080", "scheme 'socks5' is not supported"),
        ("http://proxy.example:notaport", "bad port"),
        ("http://:3128", "no host"),
    ],
)
def test_bad_proxy_names_the_variable(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        load({"https_proxy": value})
    assert str(exc.value).startswith(f"https_proxy={value}")
