"""Benchmark workloads built locally from Debian packages, and their image variants.

Everything expensive is cached under a cache directory outside the repository (default
``/var/cache/alsd-bench``, or ``$ALSD_BENCH_CACHE``) and reused when present:

* ``rootfs-<name>/``  debootstrap --variant=minbase trees (Debian mirrors are the only
  network this needs);
* ``<name>.tar``      the rootfs as one layer tar;
* ``<name>.gz``       that tar gzip-compressed (the "plain gzip" variant);
* ``<name>.<kind>.esgz`` + ``.json`` eStargz blobs written by ``alsd.oci.estargz_writer``
  (without and with prioritised files), keyed by the writer's source hash so that a change
  of the writer rebuilds them;
* ``<name>.trace``    files the container's command opened, from an ``strace`` run.

Synchronous; each step may take a while and prints what it does.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("ALSD_BENCH_CACHE", "/var/cache/alsd-bench"))
MIRROR = os.environ.get("ALSD_BENCH_MIRROR", "http://deb.debian.org/debian")


@dataclass(frozen=True)
class Workload:
    name: str
    packages: tuple[str, ...]
    cmd: tuple[str, ...]
    description: str


WORKLOADS: dict[str, Workload] = {
    "python": Workload(
        "python",
        ("python3",),
        (
            "python3",
            "-c",
            "import sys, json, email.parser, http.client, sqlite3, decimal, asyncio, "
            "xml.etree.ElementTree, urllib.request; print('hello from python', sys.version)",
        ),
        "debootstrap minbase + python3; imports a few stdlib modules and prints",
    ),
    "scipy": Workload(
        "scipy",
        ("python3", "python3-numpy", "python3-scipy"),
        (
            "python3",
            "-c",
            "import numpy, scipy.linalg; "
            "print('det', scipy.linalg.det(numpy.eye(3) * 2), numpy.__version__)",
        ),
        "debootstrap minbase + python3-numpy + python3-scipy (and their compilers/headers); "
        "imports numpy and scipy.linalg, a small fraction of the image",
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return "sha256:" + h.hexdigest()


def _sidecar(path: Path, compute: Any) -> Any:
    """JSON metadata cached next to a file (recomputed if older than the file)."""
    meta = path.with_name(path.name + ".json")
    if meta.exists() and meta.stat().st_mtime >= path.stat().st_mtime:
        return json.loads(meta.read_text())
    doc = compute()
    meta.write_text(json.dumps(doc))
    return doc


def rootfs(cache: Path, w: Workload) -> Path:
    d = cache / f"rootfs-{w.name}"
    if d.exists():
        return d
    tmp = cache / f"rootfs-{w.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (cache / "debs").mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {w.name} ({', '.join(w.packages)}) ...")
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--cache-dir={cache / 'debs'}",
         f"--include={','.join(w.packages)}", "bookworm", str(tmp), MIRROR],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    tmp.rename(d)
    return d


def layer_tar(cache: Path, w: Workload) -> Path:
    out = cache / f"{w.name}.tar"
    if not out.exists():
        src = rootfs(cache, w)
        log(f"tar {src}")
        tmp = out.with_suffix(".tmp")
        # Sorted names and numeric owners: the same tree gives the same tar (and digests).
        subprocess.run(
            ["tar", "--numeric-owner", "--sort=name", "--xattrs", "-C", str(src),
             "-cf", str(tmp), "."], check=True,
        )  # fmt: skip
        tmp.rename(out)
    return out


def tar_diff_id(tar: Path) -> str:
    doc: dict[str, str] = _sidecar(tar, lambda: {"diff_id": sha256_file(tar)})
    return doc["diff_id"]


def gzip_blob(cache: Path, w: Workload) -> Path:
    tar = layer_tar(cache, w)
    out = cache / f"{w.name}.gz"
    if not out.exists() or out.stat().st_mtime < tar.stat().st_mtime:
        log(f"gzip {tar}")
        tmp = out.with_suffix(".tmp")
        # Level 6 is what podman/pgzip and gzip(1) default to.
        with open(tar, "rb") as src, gzip.GzipFile(tmp, "wb", compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.rename(out)
    return out


def _writer_version() -> str:
    from alsd.oci import estargz_writer

    return hashlib.sha256(Path(estargz_writer.__file__).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class EsgzBlob:
    path: Path
    digest: str
    size: int
    diff_id: str
    toc_digest: str
    uncompressed_size: int
    prefetch_end: int  # compressed bytes of the prioritised region (0 without one)

    def annotations(self) -> dict[str, str]:
        from alsd.oci.estargz_writer import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION

        return {
            TOC_DIGEST_ANNOTATION: self.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
        }


def estargz_blob(cache: Path, name: str, tar: Path, prioritized: Sequence[str]) -> EsgzBlob:
    """eStargz of ``tar`` (cached by tar, file list and writer version)."""
    key = hashlib.sha256(
        "\n".join([tar.name, str(tar.stat().st_mtime_ns), _writer_version(), *prioritized]).encode()
    ).hexdigest()[:16]
    out = cache / f"{name}.{key}.esgz"
    meta = out.with_name(out.name + ".json")
    if out.exists() and meta.exists():
        doc = json.loads(meta.read_text())
        return EsgzBlob(path=out, **doc)
    from alsd.oci import formats
    from alsd.oci.estargz_writer import write_estargz

    log(f"eStargz {name} ({len(prioritized)} prioritised files) from {tar.name}")
    with open(tar, "rb") as f:
        res = write_estargz(f, prioritized=prioritized, allow_missing_prioritized=True)
    prefetch_end = 0
    try:
        tail = res.blob[-formats.TAIL_SIZE :]
        loc = formats.detect(tail, len(res.blob), {})
        idx = formats.parse_toc(loc, res.blob[loc.offset : loc.offset + loc.length],
                                len(res.blob), {})  # fmt: skip
        prefetch_end = idx.prefetch_end
    except Exception as exc:  # only a figure of the report depends on it
        log(f"  (could not read back the TOC: {exc})")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(res.blob)
    tmp.rename(out)
    doc = {
        "digest": res.blob_digest,
        "size": len(res.blob),
        "diff_id": res.diff_id,
        "toc_digest": res.toc_digest,
        "uncompressed_size": res.uncompressed_size,
        "prefetch_end": prefetch_end,
    }
    meta.write_text(json.dumps(doc))
    return EsgzBlob(path=out, **doc)


# ---- tracing what the container reads ------------------------------------------------------

_OPEN_RE = re.compile(r'(?:openat\(\w+, |open\(|execve\()"([^"]+)".*\) = (\d+)')


def _resolve_in(root: Path, path: str) -> list[str]:
    """``path`` and every symlink on the way, resolved inside ``root`` (as the container would)."""
    seen: list[str] = []
    parts = [p for p in path.split("/") if p and p != "."]
    cur: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if cur:
                cur.pop()
            continue
        cur.append(name)
        host = root.joinpath(*cur)
        if host.is_symlink() and hops < 40:
            hops += 1
            seen.append("/".join(cur))
            target = os.readlink(host)
            cur.pop()
            if target.startswith("/"):
                cur = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
    seen.append("/".join(cur))
    return seen


def traced_files(cache: Path, w: Workload) -> list[str]:
    """Regular files the workload's command opened or executed, in first-open order.

    The command runs under ``strace -f`` in a chroot of the workload's own rootfs, so paths
    are the container's paths. The ELF interpreter is mapped by the kernel, not opened, so
    it is added explicitly.
    """
    out = cache / f"{w.name}.trace"
    root = rootfs(cache, w)
    if out.exists() and out.stat().st_mtime >= root.stat().st_mtime:
        return out.read_text().split("\n") if out.read_text() else []
    log(f"strace {w.name}: {' '.join(w.cmd)[:60]}...")
    raw = cache / f"{w.name}.strace"
    subprocess.run(
        ["strace", "-f", "-qq", "-s", "4096", "-o", str(raw), "-e", "trace=open,openat,execve",
         "/usr/sbin/chroot", str(root), *w.cmd],
        check=True, stdout=subprocess.DEVNULL,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    )  # fmt: skip
    files: list[str] = []
    first_exec = True
    for line in raw.read_text(errors="replace").splitlines():
        m = _OPEN_RE.search(line)
        if not m:
            continue
        if "execve(" in line and first_exec:
            first_exec = False  # the chroot binary itself, on the host
            continue
        for p in _resolve_in(root, m[1]):
            host = root / p
            # Regular files and the symlinks leading to them (directories come with them).
            if p and p not in files and (host.is_symlink() or host.is_file()):
                files.append(p)
    for interp in ("lib64/ld-linux-x86-64.so.2",):
        for p in _resolve_in(root, interp):
            if p not in files:
                files.append(p)
    out.write_text("\n".join(files))
    return files


def trace_bytes(cache: Path, w: Workload, files: Sequence[str]) -> int:
    root = rootfs(cache, w)
    total = 0
    for f in files:
        p = root / f
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def read_set_bytes(blob: Path, annotations: dict[str, str], files: Sequence[str],
                   media_type: str | None = None) -> int:  # fmt: skip
    """Compressed bytes a store must fetch at least to serve ``files`` from ``blob``: the
    compressed ranges of their chunks (each range once) plus the TOC (and tar-split)."""
    from alsd.oci import formats
    from alsd.oci.layer_index import EntryKind

    size = blob.stat().st_size
    with open(blob, "rb") as f:
        f.seek(max(0, size - formats.TAIL_SIZE))
        tail = f.read()
        loc = formats.detect(tail, size, annotations, media_type)
        f.seek(loc.offset)
        idx = formats.parse_toc(loc, f.read(loc.length), size, annotations)
    ranges: set[tuple[int, int]] = set()
    for name in files:
        node = idx.find(name)
        if node is None or idx.attr(node).kind != EntryKind.REG:
            continue
        for c in idx.chunks(node):
            if not c.zeros:
                ranges.add((c.blob_offset, c.fetch_end))
    total = loc.length + (loc.tarsplit[1] if loc.tarsplit else 0)
    return total + sum(end - start for start, end in ranges)


# ---- synthetic layers ----------------------------------------------------------------------


def bigfile_tar(cache: Path, size: int = 100 << 20) -> Path:
    """One incompressible file of ``size`` bytes (read-throughput workload)."""
    out = cache / f"bigfile-{size >> 20}M.tar"
    if out.exists():
        return out
    log(f"making {out.name}")
    rnd = random.Random(42)
    tmp = out.with_suffix(".tmp")
    data_path = cache / "bigfile.bin"
    with open(data_path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(data_path, arcname="big.bin")
    data_path.unlink()
    tmp.rename(out)
    return out


def small_files_tar(cache: Path, n_layer: int, files: int = 2000) -> Path:
    """``files`` small files in 20 directories (restart/memory workload: many TOC entries)."""
    out = cache / f"small-{n_layer:02d}-{files}.tar"
    if out.exists():
        return out
    rnd = random.Random(n_layer)
    tmp = out.with_suffix(".tmp")
    import io

    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
        for d in range(20):
            ti = tarfile.TarInfo(f"layer{n_layer:02d}/d{d:02d}")
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            t.addfile(ti)
        for i in range(files - 20):
            data = rnd.randbytes(rnd.randint(16, 600))
            ti = tarfile.TarInfo(f"layer{n_layer:02d}/d{i % 20:02d}/f{i:05d}")
            ti.size = len(data)
            ti.mode = 0o644
            t.addfile(ti, io.BytesIO(data))
    tmp.rename(out)
    return out
