"""A loopback docker-registry for the benchmark, and a minimal pusher for hand-made images.

The benchmark pushes gzip and eStargz images with its own code instead of ``podman push``:
podman's blob-info cache may substitute an already pushed blob of the same layer with a
different compression (environment.md), which would silently turn one variant into another.
Pushing exact bytes keeps every variant what its name says.

Synchronous (urllib + subprocess): the runner is a plain script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Registry:
    """``docker-registry serve`` on 127.0.0.1 with a free port and storage under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        storage = self.workdir / "storage"
        shutil.rmtree(storage, ignore_errors=True)
        cfg = self.workdir / "config.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log: {level: error}\n"
            f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: {self.address}}}\n"
        )
        log_path = self.workdir / "registry.log"
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(cfg)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2).read()
                return self
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start (see {log_path})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None


@dataclass
class BlobRef:
    """A blob to push: bytes in memory or a file on disk."""

    digest: str
    size: int
    media_type: str
    path: Path | None = None
    data: bytes | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_bytes(cls, data: bytes, media_type: str, **kw: Any) -> BlobRef:
        return cls("sha256:" + hashlib.sha256(data).hexdigest(), len(data), media_type,
                   data=data, **kw)  # fmt: skip

    @classmethod
    def from_file(cls, path: Path, media_type: str, digest: str | None = None,
                  **kw: Any) -> BlobRef:  # fmt: skip
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while b := f.read(1 << 20):
                    h.update(b)
            digest = "sha256:" + h.hexdigest()
        return cls(digest, path.stat().st_size, media_type, path=path, **kw)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                             "size": self.size}  # fmt: skip
        if self.annotations:
            d["annotations"] = self.annotations
        return d


def _request(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
             ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def push_blob(address: str, repo: str, blob: BlobRef) -> None:
    base = f"http://{address}/v2/{repo}/blobs/"
    status, _, _ = _request("HEAD", base + blob.digest)
    if status == 200:
        return
    status, headers, body = _request("POST", base + "uploads/")
    if status != 202:
        raise RuntimeError(f"upload start: {status} {body[:200]!r}")
    loc = urllib.parse.urljoin(base, headers["Location"])
    sep = "&" if "?" in loc else "?"
    url = f"{loc}{sep}digest={urllib.parse.quote(blob.digest)}"
    hdrs = {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
    if blob.data is not None:
        status, _, body = _request("PUT", url, blob.data, hdrs)
    else:
        assert blob.path is not None
        with open(blob.path, "rb") as f:
            status, _, body = _request("PUT", url, f, hdrs)
    if status != 201:
        raise RuntimeError(f"upload {blob.digest}: {status} {body[:200]!r}")


def image_config(diff_ids: Sequence[str], cmd: Sequence[str]) -> bytes:
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": list(cmd),
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": "alsd bench"} for _ in diff_ids],
    }
    return json.dumps(cfg, separators=(",", ":")).encode()


def push_image(address: str, repo: str, tag: str, layers: Sequence[BlobRef],
               diff_ids: Sequence[str], cmd: Sequence[str]) -> str:  # fmt: skip
    """Push layers + config + an OCI manifest; returns the manifest digest."""
    config = BlobRef.from_bytes(image_config(diff_ids, cmd), OCI_CONFIG)
    for b in (*layers, config):
        push_blob(address, repo, b)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [b.descriptor() for b in layers],
    }
    data = json.dumps(manifest, separators=(",", ":")).encode()
    status, _, body = _request(
        "PUT", f"http://{address}/v2/{repo}/manifests/{tag}", data,
        {"Content-Type": OCI_MANIFEST},
    )  # fmt: skip
    if status != 201:
        raise RuntimeError(f"manifest {repo}:{tag}: {status} {body[:300]!r}")
    return "sha256:" + hashlib.sha256(data).hexdigest()


def get_manifest(address: str, repo: str, tag: str) -> dict[str, Any]:
    accept = ", ".join([OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"])
    status, _, body = _request(
        "GET", f"http://{address}/v2/{repo}/manifests/{tag}", headers={"Accept": accept}
    )
    if status != 200:
        raise RuntimeError(f"manifest {repo}:{tag}: {status}")
    doc: dict[str, Any] = json.loads(body)
    return doc


def env_path() -> str:
    return os.environ.get("PATH", "/usr/bin:/bin")
