"""Build the registry client from alsd's configuration and the containers defaults.

The one place that turns a :class:`~alsd.config.Config` into a :class:`RegistryClient`
with the same registries.conf (``registry.registries_conf``, else
``$CONTAINERS_REGISTRIES_CONF`` / ``/etc/containers/registries.conf`` + drop-ins) and the
same credential sources (``registry.auth_file``, else podman's auth file search order) as
podman. The daemon and the ``inspect``/``convert`` commands share it so that a command
sees a registry exactly as the daemon does.

Synchronous: it reads configuration files and creates no connections (the client opens
its session lazily inside the running loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from alsd.authfile import CredentialStore
from alsd.config import Config
from alsd.oci.manifest import Platform, host_platform
from alsd.regconf import load_registries_conf
from alsd.registry import RegistryClient, RegistrySettings


def credential_store(cfg: Config, cli_env: Mapping[str, str] | None = None) -> CredentialStore:
    """The credential sources of ``cfg``; malformed auth files raise ConfigError now.

    ``cli_env`` (the environment of a command-line tool) adds what podman's CLI honours
    and the daemon does not: ``REGISTRY_AUTH_FILE``, used when the config names no file.
    """
    auth_file = cfg.registry.auth_file
    if auth_file is None and cli_env is not None:
        auth_file = cli_env.get("REGISTRY_AUTH_FILE") or None
    auth_files = [Path(auth_file)] if auth_file else None
    credentials = CredentialStore(auth_files)
    credentials.check()
    return credentials


def registry_settings(cfg: Config) -> RegistrySettings:
    return RegistrySettings(
        request_timeout_s=cfg.fetch.request_timeout_s,
        max_retries=cfg.fetch.max_retries,
        max_per_host=cfg.fetch.concurrency,
    )


def registry_client(
    cfg: Config,
    *,
    credentials: CredentialStore | None = None,
    platform: Platform | None = None,
    cli_env: Mapping[str, str] | None = None,
) -> RegistryClient:
    """A client configured like the daemon's (``credentials`` default: :func:`credential_store`
    with ``cli_env``).

    Raises :class:`~alsd.errors.ConfigError` naming the file for a malformed
    registries.conf or auth file.
    """
    return RegistryClient(
        registry_settings(cfg),
        registries=load_registries_conf(cfg.registry.registries_conf),
        credentials=credentials if credentials is not None else credential_store(cfg, cli_env),
        platform=platform or host_platform(),
    )
