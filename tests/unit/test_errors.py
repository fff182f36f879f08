"""The one errno table (alsd/errors.py): what the filesystem answers for each failure."""

from __future__ import annotations

import errno

import pytest

from alsd.errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    InvalidReference,
    NotFound,
    NotLazyError,
    RegistryError,
    StoreError,
    Transient,
    Unauthorized,
    UnknownLayer,
    errno_for,
)


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (UnknownLayer("x"), errno.ENOENT),
        (InvalidReference("x"), errno.ENOENT),
        (NotLazyError("plain gzip"), errno.ENOENT),  # a subclass of FormatError: ENOENT wins
        (NotFound("x"), errno.ENOENT),
        (Unauthorized("x"), errno.ENOENT),
        # Bytes that fail their digest are never served: EIO, never wrong data.
        (IntegrityError("chunk digest mismatch"), errno.EIO),
        (FormatError("x"), errno.EIO),
        (Transient("x"), errno.EIO),
        (RegistryError("x"), errno.EIO),
        (StoreError("x"), errno.EIO),
        (ConfigError("x"), errno.EINVAL),
        (RuntimeError("a bug"), errno.EIO),
    ],
)
def test_errno_table(exc: BaseException, want: int) -> None:
    assert errno_for(exc) == want
