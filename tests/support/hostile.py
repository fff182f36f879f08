"""Hand-made hostile layers: eStargz and zstd:chunked blobs whose chunks are bombs.

An attacker writes the TOC too, so every number in it is theirs: a chunk may declare any
size and its compressed member may inflate to any size.  :class:`HostileBlob` builds
small valid blobs (gzip members or zstd frames, TOC, footer; spec.md 3.1-3.3 and 4.1)
with ordinary files and *bomb* files: a member of zeros compressed ~1000:1 (gzip) or far
more (zstd), declared with whatever size and digest the test wants::

    b = HostileBlob("estargz")
    b.file("ok.txt", b"fine\\n")
    b.bomb("bomb", declared=1 << 40, inflated=384 << 20)
    blob, toc_digest = b.finish()

Both the compressed bomb and its TOC are built without ever holding the inflated bytes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import struct
import tarfile
import zlib
from typing import Any, Literal

import zstandard

Format = Literal["estargz", "zstd"]
_PIECE = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=8)
def gzip_zeros(n: int) -> bytes:
    """One gzip member inflating to ``n`` zero bytes (level 9: about n/1000 bytes)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = bytearray()
    zeros = bytes(_PIECE)
    for start in range(0, n, _PIECE):
        out += c.compress(zeros[: min(_PIECE, n - start)])
    out += c.flush()
    return bytes(out)


@functools.lru_cache(maxsize=8)
def zstd_zeros(n: int) -> bytes:
    """One zstd frame decompressing to ``n`` zero bytes."""
    c = zstandard.ZstdCompressor(level=19).compressobj()
    out = bytearray()
    zeros = bytes(_PIECE)
    for start in range(0, n, _PIECE):
        out += c.compress(zeros[: min(_PIECE, n - start)])
    out += c.flush()
    return bytes(out)


def zeros_digest(n: int) -> str:
    """sha256 of ``n`` zero bytes, computed piecewise."""
    h = hashlib.sha256()
    zeros = bytes(_PIECE)
    for start in range(0, n, _PIECE):
        h.update(zeros[: min(_PIECE, n - start)])
    return "sha256:" + h.hexdigest()


class HostileBlob:
    """A small lazily pullable blob under construction (eStargz or zstd:chunked)."""

    def __init__(self, fmt: Format = "estargz") -> None:
        self.format = fmt
        self.data = bytearray()
        self.entries: list[dict[str, Any]] = [{"name": "./", "type": "dir", "mode": 0o755}]
        self._member(b"h" * 512)  # stands in for the first tar header

    def _member(self, data: bytes) -> int:
        off = len(self.data)
        if self.format == "estargz":
            self.data += gzip.compress(data, mtime=0)
        else:
            self.data += zstandard.ZstdCompressor().compress(data)
        return off

    def _raw(self, compressed: bytes) -> int:
        off = len(self.data)
        self.data += compressed
        return off

    def _add(self, name: str, off: int, size: int, chunk_digest: str, digest: str) -> None:
        e: dict[str, Any] = {
            "name": name,
            "type": "reg",
            "mode": 0o644,
            "size": size,
            "offset": off,
            "digest": digest,
            "chunkDigest": chunk_digest,
        }
        end = len(self.data)
        self._member(b"h" * 512)  # the next tar header
        if self.format == "zstd":
            e["endOffset"] = end
        self.entries.append(e)

    def file(self, name: str, content: bytes) -> None:
        """An honest one-chunk file."""
        off = self._member(content)
        self._add(name, off, len(content), sha(content), sha(content))

    def bomb(self, name: str, *, declared: int, inflated: int, digest: str | None = None) -> None:
        """A one-chunk file declared ``declared`` bytes long whose member inflates to
        ``inflated`` zero bytes; its digest is ``digest`` (default: that of ``declared``
        zero bytes when it is <= ``inflated``, so only the size lies, else a wrong one)."""
        compressed = gzip_zeros(inflated) if self.format == "estargz" else zstd_zeros(inflated)
        off = self._raw(compressed)
        if digest is None:
            digest = zeros_digest(declared) if declared <= inflated else sha(b"no such content")
        self._add(name, off, declared, digest, digest)

    def finish(self) -> tuple[bytes, str]:
        """(blob, TOC digest as the layer descriptor's annotation gives it)."""
        toc = json.dumps({"version": 1, "entries": self.entries}, indent="\t").encode()
        if self.format == "estargz":
            info = tarfile.TarInfo("stargz.index.json")
            info.size = len(toc)
            pad = -len(toc) % 512
            toc_off = len(self.data)
            member = gzip.compress(
                info.tobuf(tarfile.USTAR_FORMAT) + toc + bytes(pad) + bytes(1024), mtime=0
            )
            extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_off
            head = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra))
            foot = head + extra + b"\x01\x00\x00\xff\xff" + bytes(8)
            return bytes(self.data) + member + foot, sha(toc)
        # zstd:chunked, 2020 layout (40-byte footer): the checksum is over the compressed
        # manifest (containers/storage's definition).
        manifest = zstandard.ZstdCompressor().compress(toc)
        skippable = b"\x50\x2a\x4d\x18"
        m_off = len(self.data) + 8
        body = bytes(self.data) + skippable + struct.pack("<I", len(manifest)) + manifest
        footer = struct.pack("<4Q", m_off, len(manifest), len(toc), 1) + b"GnUlInUx"
        return body + skippable + struct.pack("<I", len(footer)) + footer, sha(manifest)


async def push_blob_image(
    server: Any, repo_tag: str, blob: bytes, toc_digest: str, fmt: Format = "estargz"
) -> tuple[str, str]:
    """Push a one-layer image whose layer is ``blob`` to the test registry ``server``
    (a :class:`tests.support.registry.RegistryServer`); returns (reference, blob digest).
    The layer descriptor carries the TOC digest annotation a converter writes."""
    from alsd.config import RegistrySettings
    from alsd.oci.manifest import OCI_MANIFEST, Platform
    from alsd.oci.reference import parse_reference
    from alsd.registry.client import RegistryClient
    from alsd.registry.push import Pusher
    from alsd.registry.regconf import parse_registries_conf_text

    blob_digest = sha(blob)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(b"not a real tar: " + blob[:64])]},
        "config": {},
    }).encode()  # fmt: skip
    if fmt == "estargz":
        media_type = "application/vnd.oci.image.layer.v1.tar+gzip"
        annotations = {"containerd.io/snapshot/stargz/toc.digest": toc_digest}
    else:
        media_type = "application/vnd.oci.image.layer.v1.tar+zstd"
        annotations = {"io.containers.zstd-chunked.manifest-checksum": toc_digest}
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(config), "size": len(config),
        },
        "layers": [{
            "mediaType": media_type, "digest": blob_digest, "size": len(blob),
            "annotations": annotations,
        }],
    }).encode()  # fmt: skip
    ref_str = f"{server.address}/{repo_tag}"
    ref = parse_reference(ref_str)
    conf = parse_registries_conf_text(
        f'[[registry]]\nlocation = "{server.address}"\ninsecure = true\n'
    )
    client = RegistryClient(
        RegistrySettings(max_retries=1, backoff_min_s=0.01, deadline_s=60),
        registries=conf,
        platform=Platform("linux", "amd64"),
    )
    async with client:
        pusher = Pusher(client)
        await pusher.push_blob(ref, blob_digest, blob)
        await pusher.push_blob(ref, sha(config), config)
        await pusher.push_manifest(ref, manifest, OCI_MANIFEST)
    return ref_str, blob_digest
