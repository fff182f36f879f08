"""Persistence of images and layers through the metadata store.

After a restart a known layer is answered from its record without a single registry
request. A record is a cache of what the registry said: one that does not decode, or
does not match the image it belongs to, is logged, deleted and resolved afresh (counted
in ``metadata_discarded``). Saving may fail: that costs a re-resolution after a restart,
nothing more.

Record layout (msgpack maps inside the metadata store's versioned envelope):

- ``image`` keyed by reference: ``ref``, ``manifest`` and ``config`` (bytes as served),
  ``resolved_at`` (wall clock);
- ``layer`` keyed by ``<ref>@@<blob digest>``: ``ref``, ``blob_digest``, ``toc_digest``,
  ``diff_id``, ``position``, ``compressed_size``, ``uncompressed_size``, ``index``
  (:meth:`LayerIndex.to_state`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alsd.errors import AlsdError, FormatError
from alsd.layers.model import Image, Layer, LayerStats
from alsd.layers.ports import MetadataLike
from alsd.oci.layer_index import LayerIndex
from alsd.oci.manifest import Manifest, parse_config, parse_manifest

log = logging.getLogger(__name__)

_RECORD_VERSION = 1

IMAGE = "image"
LAYER = "layer"


def layer_key(ref: str, blob_digest: str) -> str:
    return f"{ref}@@{blob_digest}"


def make_image(ref: str, manifest_bytes: bytes, config_bytes: bytes, at: float) -> Image:
    """Parse what the registry served for ``ref``; FormatError if it is not one image."""
    manifest = parse_manifest(manifest_bytes)
    if not isinstance(manifest, Manifest):
        raise FormatError(f"{ref}: the resolved manifest is an index, not an image manifest")
    config = parse_config(config_bytes)
    if len(config.diff_ids) != len(manifest.layers):
        raise FormatError(
            f"{ref}: {len(manifest.layers)} layers but {len(config.diff_ids)} diff_ids"
        )
    return Image(ref, manifest_bytes, config_bytes, manifest, config, at)


def image_record(img: Image) -> dict[str, Any]:
    return {
        "v": _RECORD_VERSION,
        "ref": img.ref,
        "manifest": img.manifest_bytes,
        "config": img.config_bytes,
        "resolved_at": img.resolved_at,
    }


def image_from_record(rec: object) -> Image:
    """Raises AlsdError, KeyError, TypeError or ValueError for a record it cannot use."""
    if not isinstance(rec, dict):
        raise TypeError("image record is not a map")
    if rec.get("v") != _RECORD_VERSION:
        raise ValueError(f"record version {rec.get('v')!r}")
    ref, m, c, at = rec["ref"], rec["manifest"], rec["config"], rec["resolved_at"]
    if not (isinstance(ref, str) and isinstance(m, bytes) and isinstance(c, bytes)):
        raise TypeError("malformed image record")
    return make_image(ref, m, c, float(at))


def layer_record(layer: Layer) -> dict[str, Any]:
    return {
        "v": _RECORD_VERSION,
        "ref": layer.ref,
        "blob_digest": layer.blob_digest,
        "toc_digest": layer.toc_digest,
        "diff_id": layer.diff_id,
        "position": layer.position,
        "compressed_size": layer.compressed_size,
        "uncompressed_size": layer.uncompressed_size,
        "index": layer.index.to_state(),
    }


@dataclass(frozen=True, slots=True)
class StoredLayer:
    """What a layer record adds to the image's manifest and config."""

    index: LayerIndex
    uncompressed_size: int | None
    toc_digest: str


def layer_from_record(rec: object, img: Image, pos: int) -> StoredLayer:
    """The stored layer ``pos`` of ``img``; raises (as image_from_record) unless the record
    matches the image's manifest and config."""
    if not isinstance(rec, dict):
        raise TypeError("layer record is not a map")
    if rec.get("v") != _RECORD_VERSION:
        raise ValueError(f"record version {rec.get('v')!r}")
    desc = img.manifest.layers[pos]
    if (
        rec["ref"] != img.ref
        or rec["blob_digest"] != desc.digest
        or rec["position"] != pos
        or rec["diff_id"] != img.config.diff_ids[pos]
        or rec["compressed_size"] != desc.size
    ):
        raise ValueError("record does not match the image manifest")
    unc = rec["uncompressed_size"]
    if unc is not None and not isinstance(unc, int):
        raise TypeError("uncompressed_size")
    index = LayerIndex.from_state(rec["index"])
    if index.blob_size != desc.size:
        raise ValueError("index blob size does not match the descriptor")
    toc = rec["toc_digest"]
    if not isinstance(toc, str):
        raise TypeError("toc_digest")
    return StoredLayer(index, unc, toc)


_UNUSABLE = (AlsdError, KeyError, TypeError, ValueError, IndexError)


class Records:
    """Loads and saves records; ``metadata`` None means nothing is persisted."""

    def __init__(self, metadata: MetadataLike | None, stats: LayerStats) -> None:
        self._metadata = metadata
        self._stats = stats

    async def load_images(self) -> list[Image]:
        """Every usable stored image (unusable ones are deleted)."""
        if self._metadata is None:
            return []
        out: list[Image] = []
        for key, rec in await self._metadata.list_async(IMAGE):
            try:
                out.append(image_from_record(rec))
            except _UNUSABLE as exc:
                log.warning("discarding stored image %r: %s", key, exc)
                self._stats.metadata_discarded += 1
                await self._metadata.delete_async(IMAGE, key)
        return out

    async def load_layer(self, img: Image, pos: int) -> StoredLayer | None:
        """The stored layer ``pos`` of ``img``, or None (absent, or unusable and deleted)."""
        if self._metadata is None:
            return None
        key = layer_key(img.ref, img.manifest.layers[pos].digest)
        rec = await self._metadata.load_async(LAYER, key)
        if rec is None:
            return None
        try:
            return layer_from_record(rec, img, pos)
        except _UNUSABLE as exc:
            await self.discard_layer(key, exc)
            return None

    async def discard_layer(self, key: str, exc: BaseException) -> None:
        if self._metadata is None:
            return
        log.warning("discarding stored layer %s: %s; resolving it afresh", key, exc)
        self._stats.metadata_discarded += 1
        await self._metadata.delete_async(LAYER, key)

    async def save_image(self, img: Image) -> None:
        await self._save(IMAGE, img.ref, image_record(img))

    async def save_layer(self, layer: Layer) -> None:
        await self._save(LAYER, layer_key(layer.ref, layer.blob_digest), layer_record(layer))

    async def _save(self, kind: str, key: str, record: Mapping[str, Any]) -> None:
        if self._metadata is None:
            return
        try:
            await self._metadata.save_async(kind, key, record)
        except AlsdError as exc:
            # Losing persistence costs a re-resolution after a restart, nothing more.
            log.warning("could not persist %s %s: %s", kind, key, exc)
