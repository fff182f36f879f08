"""What the layer manager needs from the parts around it (the seams tests fake).

The real implementations are :class:`alsd.registry.client.RegistryClient` (registry),
:class:`alsd.storage.metadata.MetadataStore` (metadata) and
:class:`alsd.storage.chunkstore.ChunkStore` (the chunk store, whose protocol is the
fetcher's :class:`alsd.fetch.fetcher.ChunkStoreLike`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from alsd.counters import ByteCounter
from alsd.fetch.fetcher import RangeReader
from alsd.oci.reference import Reference


class ResolvedLike(Protocol):
    """An image as the registry served it (``alsd.registry.client.ResolvedImage``)."""

    @property
    def manifest_bytes(self) -> bytes: ...

    @property
    def config_bytes(self) -> bytes: ...


class RegistryLike(RangeReader, Protocol):
    """The part of the registry client the layer manager uses."""

    async def resolve(
        self, ref: Reference, *, counter: ByteCounter | None = None
    ) -> ResolvedLike: ...

    async def read_ranges(
        self,
        ref: Reference,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        counter: ByteCounter | None = None,
    ) -> list[bytes]: ...


class MetadataLike(Protocol):
    """The part of the metadata store the layer manager uses (records are msgpack-able)."""

    async def save_async(self, kind: str, key: str, obj: object) -> None: ...

    async def load_async(self, kind: str, key: str) -> object | None: ...

    async def list_async(self, kind: str) -> list[tuple[str, object]]: ...

    async def delete_async(self, kind: str, key: str) -> bool: ...
