"""In-memory stand-ins behind the layer manager's and the fetcher's Protocols.

They let unit tests drive alsd/layers and alsd/fetch without a registry, a disk or a
kernel: faults (a hanging registry, a corrupt range, a failing resolution) and exact
request counts are set up directly. The real parts are tested against the real registry
in tests/integration; these fakes implement only the declared Protocols
(alsd.layers.ports.RegistryLike, alsd.fetch.fetcher.ChunkStoreLike,
alsd.layers.ports.MetadataLike).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from alsd.counters import ByteCounter
from alsd.errors import NotFound, RegistryError
from alsd.oci.estargz_writer import EstargzResult, layer_descriptor, write_estargz
from alsd.oci.reference import Reference, parse_reference


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class FakeImage:
    ref: str
    layers: list[EstargzResult]
    manifest: bytes
    config: bytes

    @property
    def blobs(self) -> dict[str, bytes]:
        return {la.blob_digest: la.blob for la in self.layers}


def make_image(
    ref: str, layer_files: Sequence[dict[str, bytes]], *, chunk_size: int = 64 << 10
) -> FakeImage:
    """An image whose layers are eStargz blobs written by alsd's own (pure) writer."""
    layers = [write_estargz(make_tar(files), chunk_size=chunk_size) for files in layer_files]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [layer_descriptor(la) for la in layers],
        }
    ).encode()
    return FakeImage(ref, layers, manifest, config)


@dataclass(frozen=True)
class Resolved:
    manifest_bytes: bytes
    config_bytes: bytes


@dataclass
class FakeRegistry:
    """Serves images from memory; counts calls; ``corrupt`` flips a byte in range reads
    that cover the given blob offset; ``gate`` (an Event) holds every call until set;
    ``fail_resolve`` makes resolve raise it."""

    images: dict[str, FakeImage] = field(default_factory=dict)
    resolves: int = 0
    range_calls: list[tuple[str, list[tuple[int, int]]]] = field(default_factory=list)
    corrupt: dict[str, int] = field(default_factory=dict)
    gate: asyncio.Event | None = None
    fail_resolve: Callable[[], Exception] | None = None

    def add(self, image: FakeImage) -> None:
        self.images[str(parse_reference(image.ref))] = image

    async def _wait(self) -> None:
        if self.gate is not None:
            await self.gate.wait()

    async def resolve(self, ref: Reference, *, counter: ByteCounter | None = None) -> Resolved:
        self.resolves += 1
        await self._wait()
        if self.fail_resolve is not None:
            raise self.fail_resolve()
        img = self.images.get(str(ref))
        if img is None:
            raise NotFound(f"{ref}: no such image")
        if counter is not None:
            counter.add_request()
            counter.add(len(img.manifest) + len(img.config))
        return Resolved(img.manifest, img.config)

    async def read_ranges(
        self,
        ref: Reference,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        counter: ByteCounter | None = None,
    ) -> list[bytes]:
        self.range_calls.append((digest, list(ranges)))
        await self._wait()
        blob = None
        for img in self.images.values():
            blob = img.blobs.get(digest, blob)
        if blob is None:
            raise RegistryError(f"{ref}: no blob {digest}")
        out = []
        for start, end in ranges:
            data = bytearray(blob[start:end])
            at = self.corrupt.get(digest)
            if at is not None and start <= at < end:
                data[at - start] ^= 0xFF
            out.append(bytes(data))
        if counter is not None:
            counter.add_request()
            counter.add(sum(len(b) for b in out))
        return out


class FakeChunkStore:
    """The chunk store's Protocol over a dict (no size limit, no eviction)."""

    def __init__(self) -> None:
        self.chunks: dict[str, bytes] = {}
        self.puts = 0
        self.advised: list[str] = []

    def has(self, digest: str) -> bool:
        return digest in self.chunks

    async def get(self, digest: str) -> bytes | None:
        return self.chunks.get(digest)

    async def put(self, digest: str, data: bytes) -> bool:
        assert sha256(data) == digest, "the fetcher must only store verified chunks"
        self.puts += 1
        self.chunks[digest] = data
        return True

    async def get_range(self, digest: str, start: int, end: int) -> bytes | None:
        data = self.chunks.get(digest)
        return None if data is None else data[start:end]

    def advise(self, digest: str) -> None:
        self.advised.append(digest)

    def stats(self) -> dict[str, int]:
        return {"count": len(self.chunks), "bytes": sum(map(len, self.chunks.values()))}


class FakeMetadata:
    """The metadata store's Protocol over a dict."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], object] = {}

    async def save_async(self, kind: str, key: str, obj: object) -> None:
        self.objects[(kind, key)] = obj

    async def load_async(self, kind: str, key: str) -> object | None:
        return self.objects.get((kind, key))

    async def list_async(self, kind: str) -> list[tuple[str, object]]:
        return [(k, v) for (kd, k), v in self.objects.items() if kd == kind]

    async def delete_async(self, kind: str, key: str) -> bool:
        return self.objects.pop((kind, key), None) is not None
