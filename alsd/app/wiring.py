"""Wiring: alsd's configuration -> the parts of the daemon and of the commands.

:func:`open_parts` builds what the daemon serves with (registry client, chunk store,
metadata store, layer manager, inode tree, FUSE operations), each registered on an
exit stack so that they are torn down in reverse order.

The registry client is built the same way for the daemon and the ``inspect``/``convert``
commands (:func:`registry_client`):

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

import os
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alsd.config import Config, registry_settings
from alsd.oci.manifest import Platform, host_platform
from alsd.registry import proxyenv
from alsd.registry.authfile import CredentialStore
from alsd.registry.client import RegistryClient
from alsd.registry.regconf import load_registries_conf

if TYPE_CHECKING:
    from alsd.fs.ops import Operations
    from alsd.layers.manager import LayerManager
    from alsd.layers.profiles import Lookup
    from alsd.oci.profile import Profile


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
        # HTTPS_PROXY, HTTP_PROXY, NO_PROXY, as podman reads them.
        proxies=proxyenv.load(os.environ if cli_env is None else cli_env),
    )


def profile_lookup(client: RegistryClient) -> Lookup:
    """The layer manager's registry lookup of an image's prefetch profile."""
    from alsd.oci.reference import parse_reference
    from alsd.registry.referrers import ProfileRegistry

    profiles = ProfileRegistry(client)

    async def lookup(ref: str, image: str) -> Profile | None:
        found = await profiles.find_profile(parse_reference(ref), image)
        return None if found is None else found.profile

    return lookup


@dataclass(frozen=True)
class DaemonParts:
    credentials: CredentialStore
    registry: RegistryClient
    manager: LayerManager
    ops: Operations


def _state_dir(path: str) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


async def open_parts(cfg: Config, stack: AsyncExitStack) -> DaemonParts:
    """Build and open the daemon's parts; ``stack`` closes them (reverse order)."""
    # Imported here: the commands that only need registry_client() do not load pyfuse3.
    from alsd.config import layer_settings
    from alsd.fs.ops import Operations
    from alsd.fs.tree import Tree
    from alsd.layers.manager import LayerManager
    from alsd.layers.materialize import LayerDirs
    from alsd.layers.materializer import relative_link_prefix
    from alsd.storage.chunkstore import ChunkStore
    from alsd.storage.metadata import MetadataStore

    state = _state_dir(cfg.state_dir)

    credentials = credential_store(cfg)
    registry = registry_client(cfg, credentials=credentials)
    stack.push_async_callback(registry.close)

    store = ChunkStore(state / "chunks", cfg.cache.max_bytes)
    await store.open()
    stack.push_async_callback(store.close)
    metadata = MetadataStore(state / "metadata")
    await metadata.sweep_async()

    layers_root = state / "layers"
    manager = LayerManager(
        registry,
        store,
        metadata,
        layer_settings(cfg),
        profile_lookup=profile_lookup(registry),
        layer_dirs=LayerDirs(layers_root),
        space=store,
        link_prefix=relative_link_prefix(layers_root, Path(cfg.mountpoint)),
    )
    await manager.load_state()
    stack.push_async_callback(manager.close)

    tree = Tree(uid=os.geteuid(), gid=os.getegid(), mtime_ns=time.time_ns())
    # The manager bounds resolution itself; this is only the backstop that keeps a
    # podman lookup from hanging if it does not.
    ops = Operations(tree, manager, resolve_timeout_s=cfg.fetch.resolve_timeout_s + 5.0)
    manager.on_materialized = ops.invalidate_diff
    manager.on_unmaterialized = ops.invalidate_toc
    return DaemonParts(credentials, registry, manager, ops)
