"""alsd.config: defaults, the shipped config/alsd.toml, and one clear message per mistake."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from alsd import config
from alsd.config import Config, ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "alsd.toml"


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "alsd.toml"
    p.write_text(text)
    return str(p)


def test_shipped_config_loads_and_equals_the_defaults() -> None:
    assert config.load(str(SHIPPED)) == Config()


def test_shipped_config_documents_every_setting() -> None:
    text = SHIPPED.read_text()
    data = tomllib.loads(text)
    # Optional paths cannot be written in TOML when unset; they appear commented out.
    commented = set(re.findall(r"^# (\w+) = ", text, re.MULTILINE))
    for key, default, doc in config.iter_settings():
        assert doc, f"{key} has no doc"
        *tables, name = key.split(".")
        node = data
        for t in tables:
            node = node[t]
        if default is None:
            assert name in commented and name not in node, key
        else:
            assert node[name] == default, key
        # every setting has a comment right above it (or above its commented line)
        lines = text.splitlines()
        idx = next(
            i
            for i, line in enumerate(lines)
            if line.startswith(f"{name} = ") or line.startswith(f"# {name} = ")
        )
        assert lines[idx - 1].startswith("#"), f"{key} has no comment"


def test_missing_default_file_means_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert config.load(None) == Config()


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=re.escape(missing) + ": no such file"):
        config.load(missing)


def test_values_are_read(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'mountpoint = "/mnt/x"\nlog_level = "debug"\n'
        "[fetch]\nrequest_timeout_s = 5\n"
        "[prefetch]\nbackground = false\n"
        '[layers]\nunknown_diff_size = "fallback"\n'
        '[registry]\nauth_file = "/etc/auth.json"\n',
    )
    cfg = config.load(path)
    assert cfg.mountpoint == "/mnt/x"
    assert cfg.log_level == "debug"
    assert cfg.fetch.request_timeout_s == 5.0
    assert isinstance(cfg.fetch.request_timeout_s, float)
    assert cfg.prefetch.background is False
    assert cfg.prefetch.landmark is True
    assert cfg.layers.unknown_diff_size == "fallback"
    assert cfg.registry.auth_file == "/etc/auth.json"
    assert cfg.registry.registries_conf is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fetch.concurrency = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ("[fetch]\nconcurency = 1\n", "unknown key 'fetch.concurency'"),
        ("[nothing]\n", "unknown key 'nothing'"),
        ('[fetch]\nconcurrency = "4"\n', "'fetch.concurrency' must be an integer, got '4'"),
        ("[fetch]\nconcurrency = 0\n", "'fetch.concurrency' must be a number greater than 0"),
        ("[fetch]\nconcurrency = true\n", "'fetch.concurrency' must be an integer"),
        ("[prefetch]\nbackground = 1\n", "'prefetch.background' must be true or false"),
        ("[layers]\nrelease_grace_s = -1\n", "'layers.release_grace_s' must be a number >= 0"),
        ("[layers]\nrelease_grace_s = nan\n", "'layers.release_grace_s' must be a number"),
        ('[layers]\nunknown_diff_size = "zero"\n', "'layers.unknown_diff_size' must be one of"),
        ('log_level = "loud"\n', "'log_level' must be one of \"debug\""),
        ('mountpoint = "relative/dir"\n', "'mountpoint' must be an absolute path"),
        ('mountpoint = "/a:b"\n', "'mountpoint' must be an absolute path without ':'"),
        ('[registry]\nauth_file = "auth.json"\n', "'registry.auth_file' must be an absolute"),
        ("fetch = 3\n", "'fetch' must be a table"),
        ("mountpoint = \n", "not valid TOML"),
    ],
)
def test_mistakes_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    msg = str(info.value)
    assert msg.startswith(path + ": ")
    assert message in msg
    assert "\n" not in msg


def test_overrides_are_validated() -> None:
    cfg = config.with_overrides(Config(), mountpoint="/mnt/y", log_level=None)
    assert cfg.mountpoint == "/mnt/y"
    assert cfg.log_level == "info"
    assert cfg.fetch == Config().fetch
    with pytest.raises(ConfigError, match="command line: 'log_level' must be one of"):
        config.with_overrides(Config(), log_level="loud")


def test_layer_settings_mapping() -> None:
    from alsd.config import LayerSettings

    cfg = config.from_dict(
        {"layers": {"unknown_diff_size": "fallback"}, "fetch": {"concurrency": 7}}
    )
    s = config.layer_settings(cfg)
    assert isinstance(s, LayerSettings)
    assert s.unknown_diff_size == "fallback"
    assert s.fetch_concurrency == 7
    assert s.resolve_timeout_s == cfg.fetch.resolve_timeout_s
    # Registry client, chunk store and daemon settings are built from cfg directly.
    for unused in ("state_dir", "cache_max_bytes", "request_timeout_s", "max_retries"):
        assert not hasattr(s, unused)
    assert s.prefetch_background is True


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9464", ("::1", 9464)),
     ("metrics.example:65535", ("metrics.example", 65535)), ("0.0.0.0:1", ("0.0.0.0", 1))],
)  # fmt: skip
def test_metrics_address(tmp_path: Path, value: str, parsed: tuple[str, int]) -> None:
    cfg = config.load(_write(tmp_path, f'[control]\nmetrics_address = "{value}"\n'))
    assert cfg.control.metrics_address == value
    assert config.parse_host_port(value) == parsed


def test_metrics_address_is_off_by_default() -> None:
    assert Config().control.metrics_address is None


@pytest.mark.parametrize(
    "value", ['"9464"', '"127.0.0.1"', '"127.0.0.1:0"', '"127.0.0.1:65536"', '"::1:9464"',
              '"[::1:9464"', '"[]:9464"', '"host:port"', '""', "9464"],
)  # fmt: skip
def test_bad_metrics_address_names_key_and_file(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, f"[control]\nmetrics_address = {value}\n")
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert str(exc.value).startswith(f"{path}: 'control.metrics_address' must be ")
