"""fuse_ops handlers called directly (no kernel): the one errno decorator.

The engine here is a stand-in that raises on purpose: an unexpected exception inside a
handler cannot be provoked through the real engine, and it is exactly the case that would
hang a syscall in pyfuse3's asyncio mode if it escaped.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import pyfuse3
import pytest

from alsd.errors import IntegrityError, NotLazyError, RegistryError
from alsd.fs.ops import Operations
from alsd.fs.tree import ROOT_INODE, Tree, encode_ref_name

REF = "registry.example/a/b:1"
DIGEST = "sha256:" + "a" * 64


class RaisingEngine:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def get_layer(self, ref: str, digest: str) -> Any:
        raise self.exc

    async def read(self, layer: Any, node: int, offset: int, size: int) -> bytes:
        raise self.exc

    async def read_blob(self, layer: Any, offset: int, size: int) -> bytes:
        raise self.exc

    def use(self, layer: Any) -> None:
        raise AssertionError("not reached")

    def release(self, layer: Any) -> None:
        raise AssertionError("not reached")


async def _layer_dir(ops: Operations) -> int:
    ctx: Any = None
    ref = await ops.lookup(pyfuse3.InodeT(ROOT_INODE), encode_ref_name(REF).encode(), ctx)
    d = await ops.lookup(ref.st_ino, DIGEST.encode(), ctx)
    return int(d.st_ino)


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (NotLazyError("plain gzip"), errno.ENOENT),
        # A layer that resolves to an error is "not in this store" for podman (issue 5):
        # it falls back to a normal pull. EIO stays for bugs and for reads of bad bytes.
        (IntegrityError("TOC digest mismatch"), errno.ENOENT),
        (RegistryError("connection refused"), errno.ENOENT),
        (RuntimeError("a bug"), errno.EIO),
        (KeyError("a bug"), errno.EIO),
    ],
)
async def test_every_exception_becomes_an_errno(
    exc: Exception, want: int, caplog: pytest.LogCaptureFixture
) -> None:
    ops = Operations(Tree(uid=0, gid=0, mtime_ns=0), RaisingEngine(exc), resolve_timeout_s=5)
    d = await _layer_dir(ops)
    with (
        caplog.at_level(logging.DEBUG, logger="alsd.fs.ops"),
        pytest.raises(pyfuse3.FUSEError) as info,
    ):
        await ops.lookup(pyfuse3.InodeT(d), b"diff", None)  # type: ignore[arg-type]
    assert info.value.errno == want
    if isinstance(exc, RuntimeError | KeyError):
        assert any(r.exc_info for r in caplog.records)  # logged with its traceback
    assert ops.stats.errors[("lookup", errno.errorcode[want])] == 1


async def test_use_and_rmdir_answer_enoent_even_when_the_layer_fails() -> None:
    ops = Operations(
        Tree(uid=0, gid=0, mtime_ns=0), RaisingEngine(NotLazyError("gzip")), resolve_timeout_s=5
    )
    d = await _layer_dir(ops)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(pyfuse3.InodeT(d), b"use", None)  # type: ignore[arg-type]
    assert info.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.create(pyfuse3.InodeT(d), b"use", pyfuse3.ModeT(0o666), 0, None)  # type: ignore[arg-type]
    assert info.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.create(pyfuse3.InodeT(d), b"other", pyfuse3.ModeT(0o666), 0, None)  # type: ignore[arg-type]
    assert info.value.errno == errno.EROFS
    assert ops.stats.uses == 0
