"""The alsd exception tree and the one table that maps it to errno values.

Every layer raises a subclass of :class:`AlsdError`; only the FUSE adapter turns
exceptions into errno values, and it does so through :func:`errno_for` and nowhere else.
"""

from __future__ import annotations

import errno


class AlsdError(Exception):
    """Base class of every error alsd raises on purpose."""


class ConfigError(AlsdError):
    """A configuration file (alsd.toml, registries.conf, auth.json) is malformed.

    The message names the file, the key and what was expected.
    """


class FormatError(AlsdError):
    """A layer blob or its TOC cannot be parsed (names the entry and the reason)."""


class NotLazyError(FormatError):
    """The layer is a valid layer, but not in a lazily pullable format (plain gzip/zstd)."""


class PlainLayer(NotLazyError):
    """A plain tar, gzip or zstd layer: it has no table of contents at all."""


class IntegrityError(AlsdError):
    """Content did not match its digest (TOC, chunk, manifest, config or blob)."""


class RegistryError(AlsdError):
    """Talking to a registry failed."""


class NotFound(RegistryError):
    """The registry says the manifest or blob does not exist (404)."""


class Unauthorized(RegistryError):
    """The registry refused us (401/403 after trying every credential we have)."""


class Transient(RegistryError):
    """A failure worth retrying: connection errors, 429, 5xx, timeouts."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreError(AlsdError):
    """The local chunk store or metadata could not be used (disk full, I/O error)."""


class InvalidReference(AlsdError, ValueError):
    """The string is not a valid image reference (names the string and the reason)."""


class UnknownLayer(AlsdError):
    """A (reference, digest) pair names no lazily pullable layer of that image."""


# Errno for each family. Why these values:
# - UnknownLayer, InvalidReference, NotLazyError, NotFound -> ENOENT: containers/storage treats any
#   stat failure of diff/info/blob as "not in this store" and pulls normally; ENOENT
#   is the honest answer and is what a plain directory store would say.
# - Unauthorized -> ENOENT as well: a layer we may not read is not present for us; the
#   normal pull then reports the real authorisation problem to the user.
# - FormatError, IntegrityError, RegistryError, StoreError -> EIO: the layer exists but
#   we cannot give correct bytes. EIO, never wrong data. (While a layer is being
#   *resolved* for an ALS lookup, fuse_ops turns these into UnknownLayer first: a layer
#   we cannot serve is simply not in this store, and podman pulls it normally.)
# - ConfigError -> EINVAL (never reached through FUSE in practice).
_ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownLayer, errno.ENOENT),
    (InvalidReference, errno.ENOENT),
    (NotLazyError, errno.ENOENT),
    (NotFound, errno.ENOENT),
    (Unauthorized, errno.ENOENT),
    (IntegrityError, errno.EIO),
    (FormatError, errno.EIO),
    (RegistryError, errno.EIO),
    (StoreError, errno.EIO),
    (ConfigError, errno.EINVAL),
)


# Exit statuses of every alsd command (the daemon and each subcommand), documented once
# in alsd(8) and the README. argparse already exits 2 for an unknown option.
EXIT_OK = 0  # it worked (inspect: lazily pullable)
EXIT_FAILED = 1  # the operation failed; stderr says why
EXIT_USAGE = 2  # usage or configuration error; nothing was done


def exit_status_for(exc: BaseException) -> int:
    """The exit status of a command that stopped on ``exc``: a configuration file that
    is missing or invalid is a configuration error (2), anything else a failure (1)."""
    return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED


def errno_for(exc: BaseException) -> int:
    """Return the errno the filesystem answers for ``exc`` (EIO for anything unknown)."""
    for cls, value in _ERRNO_TABLE:
        if isinstance(exc, cls):
            return value
    return errno.EIO
