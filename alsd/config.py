"""alsd.toml -> nested frozen dataclasses, validated in one place.

One dataclass per TOML table; the defaults live only here, in the dataclasses; units are
part of the key names (``_s``, ``_bytes``). :func:`load` rejects unknown keys, wrong types
and impossible values with a :class:`~alsd.errors.ConfigError` whose single-line message
names the file, the key and what was expected. Each field carries a ``doc`` string in its
metadata: ``alsd --help`` and the shipped ``config/alsd.toml`` document the same settings.

Pure and synchronous (reads one file).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from alsd.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/alsd.toml"

LogLevel = Literal["debug", "info", "warning", "error"]
UnknownDiffSize = Literal["lazy-zero", "fallback"]

_Check = Callable[[Any], str | None]  # returns what was expected, or None if the value is fine


def _setting(default: Any, doc: str, check: _Check | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


def _positive(v: Any) -> str | None:
    return None if v > 0 else "a number greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "a number >= 0"


def _absolute_path(v: Any) -> str | None:
    if not os.path.isabs(v):
        return "an absolute path"
    return None


def _optional_absolute_path(v: Any) -> str | None:
    return None if v is None else _absolute_path(v)


def _mountpoint(v: Any) -> str | None:
    # containers/storage splits additionallayerstores entries on ':' (spec 1.1), so a
    # mountpoint containing ':' could never be configured in storage.conf.
    if not os.path.isabs(v) or ":" in v:
        return "an absolute path without ':'"
    return None


def parse_host_port(v: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[v6]:PORT"`` for IPv6) -> (host, port); ValueError otherwise."""
    host, sep, port = v.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or ":" not in host:
            raise ValueError(v)
    elif not host or ":" in host or "[" in host or "]" in host:
        raise ValueError(v)
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(v)
    return host, int(port)


def _optional_host_port(v: Any) -> str | None:
    if v is None:
        return None
    try:
        parse_host_port(v)
    except ValueError:
        return 'HOST:PORT with a port from 1 to 65535 (for example "127.0.0.1:9464")'
    return None


@dataclass(frozen=True)
class ControlConfig:
    socket: str = _setting(
        "/run/alsd/alsd.sock",
        "unix socket of the control API (GET /status, GET /metrics, POST /credentials); "
        "created with mode 0600",
        _absolute_path,
    )
    metrics_address: str | None = _setting(
        None,
        "HOST:PORT of a TCP listener serving only GET /metrics (Prometheus text format) "
        "for a Prometheus server to scrape; off when unset. The control API stays on the "
        "unix socket",
        _optional_host_port,
    )


@dataclass(frozen=True)
class CacheConfig:
    max_bytes: int = _setting(
        10 * 1024**3,
        "size limit of the chunk store under state_dir; least recently used chunks are "
        "evicted beyond it",
        _positive,
    )


@dataclass(frozen=True)
class FetchConfig:
    concurrency: int = _setting(
        4, "maximum number of concurrent HTTP requests per registry", _positive
    )
    request_timeout_s: float = _setting(
        30.0, "timeout of one HTTP request to a registry, in seconds", _positive
    )
    resolve_timeout_s: float = _setting(
        30.0,
        "how long a lookup of diff/info/blob may wait for the image's manifest, config and "
        "the layer's table of contents before answering 'not here' (podman then pulls)",
        _positive,
    )
    max_retries: int = _setting(
        5, "retries of a failed request (connection errors, 429, 5xx)", _non_negative
    )
    merge_gap_bytes: int = _setting(
        64 * 1024,
        "neighbouring byte ranges closer than this are fetched with one range request",
        _non_negative,
    )
    readahead_bytes: int = _setting(
        512 * 1024,
        "when a read of a file to its end has to fetch from the registry, also fetch the "
        "files that follow it in its directory (which programs tend to read next), up to "
        "this many bytes of the layer, in a request of its own; 0 turns it off",
        _non_negative,
    )


@dataclass(frozen=True)
class PrefetchConfig:
    landmark: bool = _setting(
        True,
        "fetch the prioritised files before the .prefetch.landmark of an optimised eStargz "
        "layer as soon as the layer is looked up",
    )
    background: bool = _setting(
        True, "fetch the rest of every layer in the background, after the on-demand reads"
    )
    profiles: bool = _setting(
        True,
        "use prefetch profiles: when an image is first looked up, look for a profile "
        "attached to it in the registry (OCI referrers API, else the referrers tag schema) "
        "and, with what was recorded on this host, fetch the files it lists first, in order",
    )
    record: bool = _setting(
        True,
        "record a prefetch profile per image: the files its containers read in the first "
        "record_window_s seconds after a layer's first read (kept in state_dir; "
        "'alsd profile show' prints it, 'alsd profile push' attaches it to the image)",
    )
    record_window_s: float = _setting(
        10.0, "how long after a layer's first read its reads are recorded", _positive
    )
    record_max_files: int = _setting(
        1024, "at most this many files are recorded per layer of an image", _positive
    )


@dataclass(frozen=True)
class LayersConfig:
    release_grace_s: float = _setting(
        120.0,
        "a layer whose use count fell to zero is dropped from memory after this many "
        "seconds (its chunks stay in the cache)",
        _non_negative,
    )
    negative_cache_ttl_s: float = _setting(
        60.0,
        "how long a 'cannot serve this layer' answer is remembered per (reference, digest); "
        "podman 4.3 asks about every layer of every pull",
        _non_negative,
    )
    # _setting returns a dataclasses.field(); ruff only recognises that for plain types.
    unknown_diff_size: UnknownDiffSize = _setting(  # noqa: RUF009
        "lazy-zero",
        "when a layer's uncompressed size cannot be known without reading the whole layer "
        "(no uncompressed-size annotation, no tar-split): 'lazy-zero' serves it lazily with "
        "diff-size 0 (podman run works, podman save of that image fails on podman <= 5.0), "
        "'fallback' answers 'not here' so podman pulls the layer itself",
    )
    max_chunk_bytes: int = _setting(
        64 << 20,
        "largest uncompressed chunk a layer's table of contents may declare (bytes inflated "
        "before it in its member included; zstd:chunked zeros chunks exempt): a layer with a "
        "larger one is not served lazily (podman pulls it); every chunk read costs about "
        "twice its size in memory while it is decoded",
        _positive,
    )
    materialize: bool = _setting(
        True,
        "once every chunk of a layer is stored, extract it into a directory under state_dir "
        "and answer its diff as a symlink to it: containers started afterwards read the "
        "local disk directly, without FUSE (counted in [cache] max_bytes)",
    )


@dataclass(frozen=True)
class RegistryConfig:
    registries_conf: str | None = _setting(
        None,
        "registries.conf to read mirrors and insecure registries from; unset: the "
        "containers defaults ($CONTAINERS_REGISTRIES_CONF, /etc/containers/registries.conf)",
        _optional_absolute_path,
    )
    auth_file: str | None = _setting(
        None,
        "auth.json with registry credentials; unset: podman's search order "
        "($XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json, "
        "~/.docker/config.json)",
        _optional_absolute_path,
    )


@dataclass(frozen=True)
class FuseConfig:
    max_tasks: int = _setting(
        64,
        "maximum number of FUSE requests handled concurrently (pyfuse3 worker tasks)",
        _positive,
    )
    read_ahead_kb: int = _setting(
        4096,
        "kernel read-ahead of the mount in KiB (its bdi's read_ahead_kb, set after mounting "
        "when run as root); larger read-ahead means fewer, larger FUSE read requests "
        "(the kernel caps one at 1 MiB); 0 keeps the kernel's default (128)",
        _non_negative,
    )


@dataclass(frozen=True)
class Config:
    mountpoint: str = _setting(
        "/var/lib/alsd/store",
        "where the layer store is mounted; storage.conf names it as "
        'additionallayerstores = ["<mountpoint>:ref"]',
        _mountpoint,
    )
    state_dir: str = _setting(
        "/var/lib/alsd", "chunk cache and layer metadata (kept across restarts)", _absolute_path
    )
    log_level: LogLevel = _setting("info", "debug, info, warning or error")  # noqa: RUF009
    control: ControlConfig = field(default_factory=ControlConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)


def _type_check(tp: Any, value: Any) -> str | None:
    """None if ``value`` has the TOML type ``tp`` asks for, else what was expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return None
        return "one of " + ", ".join(f'"{c}"' for c in choices)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        # TOML has no null: an optional setting is unset by leaving the key out.
        return _type_check(args[0], value)
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "an integer"
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and math.isfinite(value):
            return None
        return "a number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    raise TypeError(f"unsupported setting type {tp!r}")  # a bug in this module


def _build(cls: type[Any], data: Mapping[str, Any], path: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{path}: unknown key '{prefix}{key}' (keys allowed in {where}: {known})"
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value = data[name]
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: '{key}' must be a table ([{key}])")
            kwargs[name] = _build(typing.cast(type[Any], tp), value, path, key + ".")
            continue
        expected = _type_check(tp, value)
        if expected is None and f.metadata.get("check") is not None:
            expected = f.metadata["check"](value)
        if expected is not None:
            raise ConfigError(f"{path}: '{key}' must be {expected}, got {value!r}")
        if tp is float:
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any], path: str = "<config>") -> Config:
    """Validate parsed TOML and build the :class:`Config` (``path`` is for messages)."""
    cfg: Config = _build(Config, data, path, "")
    return cfg


def load(path: str | None) -> Config:
    """Read ``path``; ``None`` means the default file, which may be missing (all defaults).

    An explicitly named file that is missing is an error.
    """
    explicit = path is not None
    file = path if path is not None else DEFAULT_CONFIG_PATH
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{file}: no such file") from None
        return Config()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    return from_dict(data, file)


def with_overrides(cfg: Config, source: str = "command line", **top_level: Any) -> Config:
    """Apply command-line overrides of top-level settings (``None`` = not given), validated
    like the file."""
    given = {k: v for k, v in top_level.items() if v is not None}
    if not given:
        return cfg
    current = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)}
    tables = {k: v for k, v in current.items() if dataclasses.is_dataclass(v)}
    merged = {k: v for k, v in current.items() if k not in tables} | given
    checked: Config = _build(Config, merged, source, "")
    return dataclasses.replace(checked, **tables)  # type: ignore[arg-type]


def iter_settings(cls: type[Any] = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every setting as (dotted key, default, doc), in declaration order."""
    out: list[tuple[str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(iter_settings(typing.cast(type[Any], tp), prefix + f.name + "."))
        else:
            out.append((prefix + f.name, f.default, f.metadata.get("doc", "")))
    return out


# ------------------------------------------------------------------ settings of the parts
#
# The parts are not handed the whole Config: each gets a frozen settings object holding
# what it can be told, filled from alsd.toml by the functions below. Settings that are
# not in alsd.toml (internal limits) have their defaults here too; the defaults of those
# that are come from the Config dataclasses above, so that each is written once.

_DEFAULT = Config()


@dataclass(frozen=True)
class LayerSettings:
    """Everything the layer manager (alsd/layers) can be told.

    Settings of the registry client, the chunk store and the daemon (request timeout,
    retries, cache size, registries.conf, auth file, state directory) are not here: those
    parts are built from the configuration directly (alsd/app/wiring.py).
    """

    fetch_concurrency: int = _DEFAULT.fetch.concurrency
    resolve_timeout_s: float = _DEFAULT.fetch.resolve_timeout_s
    merge_gap_bytes: int = _DEFAULT.fetch.merge_gap_bytes
    readahead_bytes: int = _DEFAULT.fetch.readahead_bytes
    max_request_bytes: int = 8 << 20
    max_ranges_per_request: int = 16
    prefetch_landmark: bool = _DEFAULT.prefetch.landmark
    prefetch_background: bool = _DEFAULT.prefetch.background
    profiles_use: bool = _DEFAULT.prefetch.profiles
    profiles_record: bool = _DEFAULT.prefetch.record
    record_window_s: float = _DEFAULT.prefetch.record_window_s
    record_max_files: int = _DEFAULT.prefetch.record_max_files
    # How long a layer's prefetch waits for the image's registry profile lookup (started
    # with the image's first lookup, so normally already answered).
    profile_lookup_wait_s: float = 5.0
    background_max_layer_bytes: int | None = None
    background_batch_bytes: int = 4 << 20
    background_concurrency: int = 1
    quiet_period_s: float = 2.0
    # A layer's background fetch starts only after the first read of one of its files
    # (a container runs on it: its start comes first, then the quiet period), or this
    # long after the layer was resolved if nothing reads it (a layer only pulled).
    background_unread_wait_s: float = 10.0
    release_grace_s: float = _DEFAULT.layers.release_grace_s
    negative_cache_ttl_s: float = _DEFAULT.layers.negative_cache_ttl_s
    unknown_diff_size: UnknownDiffSize = _DEFAULT.layers.unknown_diff_size
    max_toc_bytes: int = 64 << 20
    max_chunk_bytes: int = _DEFAULT.layers.max_chunk_bytes
    blob_readahead_bytes: int = 1 << 20
    # Landmark prefetch requests are at most this large: a request's chunks are decoded
    # and served only once its whole body has arrived, and the prioritised region is in
    # the order the container reads it, so small requests let it start early.
    prefetch_request_bytes: int = 1 << 20
    materialize: bool = _DEFAULT.layers.materialize


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """Everything the registry client (alsd/registry) can be told."""

    request_timeout_s: float = _DEFAULT.fetch.request_timeout_s  # one request, whole body
    connect_timeout_s: float = 10.0
    deadline_s: float = 120.0  # one public call, all retries and endpoints included
    max_retries: int = _DEFAULT.fetch.max_retries  # per public call (shared by its requests)
    backoff_min_s: float = 0.2
    backoff_max_s: float = 10.0
    max_connections: int = 32
    # A client built without alsd.toml (tests, library use) allows more than the daemon's
    # [fetch] concurrency; the daemon's client gets that setting (registry_settings()).
    max_per_host: int = 8
    max_ranges_per_request: int = 32
    max_manifest_bytes: int = 4 << 20
    max_config_bytes: int = 16 << 20
    blob_segment_bytes: int = 8 << 20  # read_blob fetches this much per request
    user_agent: str = "alsd"
    # A blob sent whole for a range request (a pull-through cache still filling) is kept
    # for the next reads of it: up to this many bytes in all, for this long.
    whole_blob_keep_bytes: int = 64 << 20
    whole_blob_keep_s: float = 300.0
    # A body that sends nothing for stall_factor x the host's usual time to first byte,
    # clamped to [stall_min_s, stall_max_s], is broken off and asked again at once.
    stall_factor: float = 20.0
    stall_min_s: float = 1.5
    stall_max_s: float = 10.0
    # A blob read still unanswered after hedge_factor x the usual time for its size,
    # clamped to [hedge_min_s, hedge_max_s], gets a second request; the first answer wins.
    hedge_factor: float = 4.0
    hedge_min_s: float = 1.0
    hedge_max_s: float = 8.0


def layer_settings(cfg: Config) -> LayerSettings:
    """The layer manager's settings from ``cfg``."""
    return LayerSettings(
        fetch_concurrency=cfg.fetch.concurrency,
        resolve_timeout_s=cfg.fetch.resolve_timeout_s,
        merge_gap_bytes=cfg.fetch.merge_gap_bytes,
        readahead_bytes=cfg.fetch.readahead_bytes,
        prefetch_landmark=cfg.prefetch.landmark,
        prefetch_background=cfg.prefetch.background,
        profiles_use=cfg.prefetch.profiles,
        profiles_record=cfg.prefetch.record,
        record_window_s=cfg.prefetch.record_window_s,
        record_max_files=cfg.prefetch.record_max_files,
        release_grace_s=cfg.layers.release_grace_s,
        negative_cache_ttl_s=cfg.layers.negative_cache_ttl_s,
        unknown_diff_size=cfg.layers.unknown_diff_size,
        max_chunk_bytes=cfg.layers.max_chunk_bytes,
        materialize=cfg.layers.materialize,
    )


def registry_settings(cfg: Config) -> RegistrySettings:
    """The registry client's settings from ``cfg``."""
    return RegistrySettings(
        request_timeout_s=cfg.fetch.request_timeout_s,
        max_retries=cfg.fetch.max_retries,
        max_per_host=cfg.fetch.concurrency,
    )
