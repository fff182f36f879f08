"""registries.conf v2: files, drop-ins, prefixes, mirrors, endpoints, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from alsd.errors import ConfigError, Unauthorized
from alsd.oci.reference import parse_reference
from alsd.registry.regconf import (
    Endpoint,
    RegistriesConf,
    load_registries_conf,
    parse_registries_conf_text,
)

D = "sha256:" + "cd" * 32
MIRROR = "[[registry]]\nlocation = 'x'\n[[registry.mirror]]\n"

CONF = """
unqualified-search-registries = ["quay.io", "docker.io"]

[[registry]]
location = "docker.io"
[[registry.mirror]]
location = "mirror.local:5000/hub"
insecure = true
[[registry.mirror]]
location = "digest-mirror.local"
pull-from-mirror = "digest-only"

[[registry]]
prefix = "example.com/team"
location = "internal.example:8443/proxy/team"
insecure = true

[[registry]]
prefix = "example.com"
location = "example.com"

[[registry]]
prefix = "*.wild.test"
[[registry.mirror]]
location = "wm.local"

[[registry]]
location = "bad.example"
blocked = true
"""


def eps(text: str, ref: str) -> list[Endpoint]:
    return parse_registries_conf_text(text, "test.conf").endpoints(parse_reference(ref))


def test_search_registries() -> None:
    conf = parse_registries_conf_text(CONF)
    assert conf.unqualified_search_registries == ("quay.io", "docker.io")


def test_docker_hub_mirrors_then_hub() -> None:
    assert eps(CONF, "busybox") == [
        Endpoint("mirror.local:5000", "mirror.local:5000", "http", "hub/library/busybox", True),
        Endpoint("docker.io", "registry-1.docker.io", "https", "library/busybox", False),
    ]
    # digest-only mirrors are used for digest references only.
    assert [e.host for e in eps(CONF, f"busybox@{D}")] == [
        "mirror.local:5000", "digest-mirror.local", "registry-1.docker.io",
    ]  # fmt: skip


def test_longest_prefix_and_location_rewrite() -> None:
    assert eps(CONF, "example.com/team/app:1") == [
        Endpoint("internal.example:8443", "internal.example:8443", "http", "proxy/team/app", False)
    ]
    assert eps(CONF, "example.com/other:1") == [
        Endpoint("example.com", "example.com", "https", "other", False)
    ]
    # "example.com/teamx" does not match the "example.com/team" prefix.
    assert eps(CONF, "example.com/teamx/a")[0].repository == "teamx/a"
    # No entry: the registry itself over HTTPS.
    assert eps(CONF, "quay.io/a/b") == [Endpoint("quay.io", "quay.io", "https", "a/b", False)]


def test_wildcard() -> None:
    assert [(e.host, e.repository) for e in eps(CONF, "x.wild.test/ns/app")] == [
        ("wm.local", "ns/app"), ("x.wild.test", "ns/app"),
    ]  # fmt: skip


def test_blocked() -> None:
    with pytest.raises(Unauthorized, match=r"bad\.example.*blocked in test\.conf"):
        eps(CONF, "bad.example/x")


def test_mirror_by_digest_only() -> None:
    text = (
        '[[registry]]\nlocation = "r.io"\nmirror-by-digest-only = true\n'
        '[[registry.mirror]]\nlocation = "m.io"\n'
    )
    assert [e.host for e in eps(text, "r.io/a:t")] == ["r.io"]
    assert [e.host for e in eps(text, f"r.io/a@{D}")] == ["m.io", "r.io"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[[registry]\nlocation='x'", "not valid TOML"),
        ("[[registry]]\nlocation = 5", "key 'location' must be a string"),
        ("[[registry]]\nlocation = 'x'\ninsecure = 'yes'", "key 'insecure' must be true or false"),
        ("[[registry]]\nlocation = 'x'\nblocked = 1", "key 'blocked'"),
        ("[[registry]]\ninsecure = true", "needs 'location' or 'prefix'"),
        ("[[registry]]\nlocation = 'https://x'", "must not contain a scheme"),
        ("[[registry]]\nprefix = '*.x'\nlocation = 'y'", "not allowed with wildcard"),
        ("registry = 5", "key 'registry' must be an array"),
        ("unqualified-search-registries = 'quay.io'", "unqualified-search-registries"),
        (MIRROR + "insecure = true", "mirror 0: key 'location'"),
        (MIRROR + "location = 'm'\npull-from-mirror = 'x'", "pull-from-mirror"),
        ("[registries.search]\nregistries = ['a']", "v1 format"),
    ],
)  # fmt: skip
def test_errors_name_file_and_key(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as exc:
        parse_registries_conf_text(text, "my/registries.conf")
    assert "my/registries.conf" in str(exc.value)


def test_files_env_and_dropins(tmp_path: Path) -> None:
    main = tmp_path / "main.conf"
    main.write_text(
        'unqualified-search-registries = ["a.io"]\n'
        '[[registry]]\nlocation = "r.io"\n'
        '[[registry]]\nlocation = "keep.io"\ninsecure = true\n'
    )
    d = tmp_path / "d"
    d.mkdir()
    (d / "10-first.conf").write_text('[[registry]]\nlocation = "r.io"\ninsecure = true\n')
    (d / "20-second.conf").write_text('unqualified-search-registries = ["b.io"]\n')
    (d / "ignored.txt").write_text("not toml at all [")
    conf = load_registries_conf(dropin_dirs=[d], env={"CONTAINERS_REGISTRIES_CONF": str(main)})
    assert conf.files == (str(main), str(d / "10-first.conf"), str(d / "20-second.conf"))
    assert conf.unqualified_search_registries == ("b.io",)  # a later file overrides
    assert eps_of(conf, "r.io/x")[0].scheme == "http"  # the drop-in replaced the entry
    assert eps_of(conf, "keep.io/x")[0].scheme == "http"  # untouched entries stay
    # An explicit path wins over the environment.
    other = tmp_path / "other.conf"
    other.write_text("")
    assert load_registries_conf(
        other, dropin_dirs=[], env={"CONTAINERS_REGISTRIES_CONF": str(main)}
    ).files == (str(other),)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_registries_conf(tmp_path / "nope.conf", dropin_dirs=[])
    # A missing drop-in directory is not an error (podman ships none by default).
    main = tmp_path / "main.conf"
    main.write_text("")
    assert load_registries_conf(main, dropin_dirs=[tmp_path / "none"]).files == (str(main),)


def test_bad_dropin_names_file(tmp_path: Path) -> None:
    (tmp_path / "x.conf").write_text("[[registry]]\nlocation = 1\n")
    main = tmp_path / "main.conf"
    main.write_text("")
    with pytest.raises(ConfigError, match=r"x\.conf.*'location'"):
        load_registries_conf(main, dropin_dirs=[tmp_path])


def eps_of(conf: RegistriesConf, ref: str) -> list[Endpoint]:
    return conf.endpoints(parse_reference(ref))
