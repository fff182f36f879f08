"""Regenerate the input tars of the eStargz reference fixtures (see README.md).

Deterministic: running it again must reproduce input-pax.tar and input-gnu.tar bit for bit.
Usage: python make_inputs.py OUTPUT_DIR
"""

from __future__ import annotations

import io
import random
import sys
import tarfile
from pathlib import Path


def build(fmt: int) -> bytes:
    rnd = random.Random(20240601)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:

        def add(name: str, typ: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            ti.type = typ
            ti.size = len(data) if typ == tarfile.REGTYPE else 0
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if typ == tarfile.REGTYPE else None)

        add("./", tarfile.DIRTYPE, mode=0o755, mtime=1700000000)
        add("./etc/", tarfile.DIRTYPE, mode=0o755, mtime=1700000000, uname="root", gname="root")
        add("./etc/hello.txt", data=b"hello world\n", mode=0o644, mtime=1700000001,
            uid=1000, gid=1000, uname="alice", gname="staff")  # fmt: skip
        add("etc/suid", data=b"#!/bin/sh\n", mode=0o4755, mtime=1700000002,
            uid=1000, gid=1000, uname="alice", gname="staff")  # fmt: skip
        add("big.bin", data=rnd.randbytes(10000), mode=0o600, mtime=1700000003)
        add("exact.bin", data=b"e" * 8192, mode=0o640, mtime=1700000003)
        add("empty", mode=0o644, mtime=1700000004)
        add("link", tarfile.SYMTYPE, linkname="etc/hello.txt", mtime=1700000005)
        add("hard", tarfile.LNKTYPE, linkname="etc/hello.txt", mtime=1700000005)
        add("etc/.wh.gone", mode=0o644)
        add("opq/", tarfile.DIRTYPE, mode=0o755, mtime=1700000006)
        add("opq/.wh..wh..opq")
        add("dev/", tarfile.DIRTYPE, mode=0o755)
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660)
        add("fifo", tarfile.FIFOTYPE, mode=0o644)
        add("d/" + "long" * 40 + "/file.txt", data=b"deep <&>\n", mode=0o644)
        add("uni-\u00e9\u2028.txt", data=b"u", mode=0o644, uid=3000000, uname="u" * 40)
        add("dup.txt", data=b"first\n", mode=0o644)
        add(".prefetch.landmark", data=b"\x0f")  # dropped by the builder
        add("stargz.index.json", data=b"{}")  # dropped by the builder
        add("dup.txt", data=b"second\n", mode=0o644, mtime=1700000009)  # replaces the first
        if fmt == tarfile.PAX_FORMAT:
            ti = tarfile.TarInfo("xattr.txt")
            ti.size = 3
            ti.mtime = 1700000007.25
            ti.pax_headers = {
                "SCHILY.xattr.user.foo": "bar",
                "SCHILY.xattr.trusted.overlay.opaque": "y",
                "SCHILY.xattr.security.capability": "\x01\x02",
            }
            tf.addfile(ti, io.BytesIO(b"abc"))
            ti = tarfile.TarInfo("old")
            ti.mtime = -1.5
            tf.addfile(ti, io.BytesIO(b""))
    return buf.getvalue()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    (out / "input-pax.tar").write_bytes(build(tarfile.PAX_FORMAT))
    (out / "input-gnu.tar").write_bytes(build(tarfile.GNU_FORMAT))
