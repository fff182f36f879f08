"""Images converted by a third-party tool: ``ctr-remote`` (Debian's ``stargz-snapshotter``).

``ctr-remote image convert`` works on images held by a containerd it talks to, so the
benchmark starts a private one (Debian's ``containerd``; own root, state and socket under
a temporary directory, no systemd), pulls the workload's gzip image into it from the
loopback registry, converts it and pushes the result back. The converted layer blob and
its descriptor are then cached next to the workload's other blobs and pushed with the
benchmark's own pusher afterwards (exact bytes, see bench/registry.py), so a second run
converts nothing.

Kinds (the tag suffix in the registry, ``ctr-<kind>``):

* ``esgz``       ``--oci --estargz``: eStargz without prioritised files;
* ``esgz-prio``  ``--oci --estargz --estargz-record-in R``: R lists the traced files in the
  record format ``ctr-remote image optimize --record-out`` writes (one JSON object with a
  ``path`` per file);
* ``zstd``       ``--oci --zstdchunked``: stargz-snapshotter's zstd:chunked.

Synchronous, like the rest of the runner.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import registry as reg
from bench.workloads import log

KINDS: dict[str, tuple[str, ...]] = {
    "esgz": ("--oci", "--estargz"),
    "esgz-prio": ("--oci", "--estargz"),  # + --estargz-record-in
    "zstd": ("--oci", "--zstdchunked"),
}
NAMESPACE = "alsdbench"


def available() -> str | None:
    """Why ctr-remote conversions cannot run here, or None."""
    for tool, pkg in (("ctr-remote", "stargz-snapshotter"), ("containerd", "containerd")):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package {pkg})"
    return None


def tool_version() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "stargz-snapshotter"],
                         capture_output=True, text=True)  # fmt: skip
    return (
        out.stdout.strip()
        or subprocess.run(
            ["ctr-remote", "--version"], capture_output=True, text=True
        ).stdout.strip()
    )


@dataclass(frozen=True)
class ConvertedLayer:
    """A converted layer blob (cached) and what its manifest and config said about it."""

    path: Path
    digest: str
    size: int
    media_type: str
    annotations: dict[str, str]
    diff_id: str

    def blob_ref(self) -> reg.BlobRef:
        return reg.BlobRef.from_file(self.path, self.media_type, digest=self.digest,
                                     annotations=self.annotations)  # fmt: skip


class Containerd:
    """A private containerd (root, state, socket in ``dir``), stopped on exit."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.sock = d / "c.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Containerd:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "config.toml"
        # Only what conversion needs: the content store, images, leases. No CRI, no
        # snapshotters other than overlayfs (pull unpacks into it), nothing under /opt.
        cfg.write_text(
            "version = 2\n"
            f'root = "{d / "root"}"\n'
            f'state = "{d / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",'
            ' "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",'
            ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",'
            ' "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]\n'
            f'[grpc]\n  address = "{self.sock}"\n'
            f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
        )
        log_path = d / "containerd.log"
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(["containerd", "--config", str(cfg)],
                                         stdout=out, stderr=out)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(self._ctr("version"), capture_output=True, text=True)
            if r.returncode == 0:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = log_path.read_text(errors="replace")[-800:]
                raise RuntimeError(f"containerd did not start: {tail}")
            time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # Pull unpacked into overlayfs snapshots; their mounts are gone with containerd,
        # but be sure nothing is left mounted under the directory before removing it.
        subprocess.run(["umount", "-R", "-l", str(self.dir / "root")], capture_output=True)

    def _ctr(self, *args: str) -> list[str]:
        return ["ctr-remote", "--address", str(self.sock), "--namespace", NAMESPACE, *args]

    def ctr(self, *args: str, timeout: float = 1800) -> str:
        r = subprocess.run(self._ctr(*args), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"ctr-remote {' '.join(args)}: {(r.stderr or r.stdout)[-600:]}")
        return r.stdout


def record_file(path: Path, files: Sequence[str]) -> None:
    """``files`` in the record format ``ctr-remote image optimize --record-out`` writes."""
    with open(path, "w") as f:
        for p in files:
            f.write(json.dumps({"path": p}) + "\n")


def fetch_blob(address: str, repo: str, digest: str, dest: Path) -> None:
    url = f"http://{address}/v2/{repo}/blobs/{digest}"
    tmp = dest.with_suffix(".tmp")
    h = hashlib.sha256()
    import urllib.request

    with urllib.request.urlopen(url, timeout=600) as r, open(tmp, "wb") as f:
        while b := r.read(1 << 20):
            h.update(b)
            f.write(b)
    if "sha256:" + h.hexdigest() != digest:
        raise RuntimeError(f"blob {digest} fetched with another digest")
    tmp.rename(dest)


def _key(gzip_digest: str, kind: str, prioritized: Sequence[str]) -> str:
    return hashlib.sha256(
        "\n".join([gzip_digest, kind, tool_version(), *prioritized]).encode()
    ).hexdigest()[:16]


def cached(cache: Path, name: str, gzip_digest: str, kind: str,
           prioritized: Sequence[str]) -> ConvertedLayer | None:  # fmt: skip
    meta = cache / f"{name}.ctr-{kind}.{_key(gzip_digest, kind, prioritized)}.json"
    if not meta.exists():
        return None
    doc = json.loads(meta.read_text())
    path = Path(doc.pop("path"))
    if not path.exists():
        return None
    return ConvertedLayer(path=path, **doc)


@contextlib.contextmanager
def _tmpdir(parent: Path) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    # Short: containerd's socket path must fit in sun_path (108 bytes).
    d = Path(tempfile.mkdtemp(prefix="ctr", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def convert_all(
    cache: Path, workdir: Path, address: str, name: str, gzip_tag: str, gzip_digest: str,
    prioritized: Sequence[str], kinds: Sequence[str],
) -> dict[str, ConvertedLayer]:  # fmt: skip
    """Every kind of ``kinds`` for the one-layer image ``bench/<name>:<gzip_tag>`` at
    ``address`` (plain HTTP), from the cache or converted now (one containerd for all)."""
    out: dict[str, ConvertedLayer] = {}
    todo = []
    for kind in kinds:
        prio = prioritized if kind == "esgz-prio" else ()
        c = cached(cache, name, gzip_digest, kind, prio)
        if c is not None:
            out[kind] = c
        else:
            todo.append(kind)
    if not todo:
        return out
    src = f"{address}/bench/{name}:{gzip_tag}"
    with _tmpdir(workdir) as d, Containerd(d) as ctd:
        log(f"ctr-remote: pull {src} into a private containerd")
        ctd.ctr("images", "pull", "--plain-http", src)
        for kind in todo:
            prio = prioritized if kind == "esgz-prio" else ()
            tag = f"ctr-{kind}"
            dst = f"{address}/bench/{name}:{tag}"
            args = list(KINDS[kind])
            if kind == "esgz-prio":
                rec = d / "record.json"
                record_file(rec, prio)
                args += ["--estargz-record-in", str(rec)]
            log(f"ctr-remote image convert {' '.join(args[:3])}... {name} -> {tag}")
            ctd.ctr("images", "convert", *args, src, dst)
            ctd.ctr("images", "push", "--plain-http", dst)
            m = reg.get_manifest(address, f"bench/{name}", tag)
            if len(m["layers"]) != 1:
                raise RuntimeError(f"ctr-remote wrote {len(m['layers'])} layers, expected 1")
            lay = m["layers"][0]
            cfg_path = d / "config.json"
            fetch_blob(address, f"bench/{name}", m["config"]["digest"], cfg_path)
            diff_id = json.loads(cfg_path.read_text())["rootfs"]["diff_ids"][0]
            key = _key(gzip_digest, kind, prio)
            blob = cache / f"{name}.ctr-{kind}.{key}.blob"
            fetch_blob(address, f"bench/{name}", lay["digest"], blob)
            doc = {"digest": lay["digest"], "size": lay["size"], "media_type": lay["mediaType"],
                   "annotations": lay.get("annotations", {}), "diff_id": diff_id}  # fmt: skip
            (cache / f"{name}.ctr-{kind}.{key}.json").write_text(
                json.dumps({"path": str(blob), **doc})
            )
            out[kind] = ConvertedLayer(path=blob, **doc)
    return out
