"""The image catalog: reference -> resolved manifest and config, cached and persisted.

An image is resolved once per reference (a singleflight task, see
:mod:`alsd.layers.singleflight`) and kept for the daemon's lifetime; it is resolved again
only when a digest it does not contain is asked for after ``negative_cache_ttl_s`` (the
tag may have moved). A failure is remembered per reference, so that podman 4.3, which
asks about every layer of a pull in turn, costs one failed resolution, not one per
layer. Once a lookup timed out waiting for an image, the next lookups answer at once
(Transient) until that resolution ends.
"""

from __future__ import annotations

import asyncio
import logging
import time

from alsd.counters import ByteCounter
from alsd.errors import AlsdError, RegistryError, Transient, UnknownLayer
from alsd.layers.model import Image, LayerStats
from alsd.layers.ports import RegistryLike
from alsd.layers.records import Records, make_image
from alsd.layers.singleflight import NegativeCache, SingleFlight
from alsd.oci.reference import parse_reference

log = logging.getLogger(__name__)


def image_key(ref: str) -> tuple[str, str]:
    """The negative-cache key of an image (layers use (ref, digest))."""
    return (ref, "")


class ImageCatalog:
    def __init__(
        self,
        registry: RegistryLike,
        records: Records,
        negative: NegativeCache[tuple[str, str]],
        stats: LayerStats,
        counter: ByteCounter,
    ) -> None:
        self._registry = registry
        self._records = records
        self._negative = negative
        self._stats = stats
        self._counter = counter
        self._images: dict[str, Image] = {}
        self._flights: SingleFlight[tuple[str, str], Image] = SingleFlight(negative)
        # References whose resolution outlived a lookup's resolve_timeout_s and still runs.
        self._slow: set[str] = set()

    def refs(self) -> list[str]:
        return sorted(self._images)

    def resolving(self) -> int:
        return len(self._flights)

    def is_resolving(self, ref: str) -> bool:
        return image_key(ref) in self._flights

    def mark_slow(self, ref: str) -> None:
        """A lookup of ``ref`` timed out: the next ones should not wait as long."""
        if self.is_resolving(ref):
            self._slow.add(ref)

    async def load(self) -> None:
        for img in await self._records.load_images():
            self._images.setdefault(img.ref, img)
        log.info("loaded %d image(s) from metadata", len(self._images))

    def cancel_all(self) -> list[asyncio.Task[Image]]:
        return self._flights.cancel_all()

    async def get(self, ref: str, *, refresh: bool = False) -> Image:
        img = self._images.get(ref)
        if img is not None and not refresh:
            return img
        if img is None:
            # A known image is still served while a refresh fails; an unknown one is not
            # asked for again until its failure expires.
            self._negative.check(image_key(ref))
            if ref in self._slow and self.is_resolving(ref):
                self._stats.negative_hits += 1
                raise Transient(f"{ref}: still resolving after a lookup timed out")
        task = self._flights.start(
            image_key(ref), lambda: self._resolve(ref), on_end=lambda: self._slow.discard(ref)
        )
        return await asyncio.shield(task)

    async def _resolve(self, ref: str) -> Image:
        try:
            reference = parse_reference(ref)
        except AlsdError as exc:
            raise UnknownLayer(f"{ref!r} is not a valid image reference: {exc}") from None
        self._stats.image_resolves += 1
        try:
            resolved = await self._registry.resolve(reference, counter=self._counter)
            img = make_image(ref, resolved.manifest_bytes, resolved.config_bytes, time.time())
        except AlsdError as exc:
            self._stats.image_errors += 1
            # Once per failed resolution (the failure is then cached per reference).
            log.warning(
                "%s: cannot resolve the image, its layers are pulled normally: %s", ref, exc
            )
            raise
        except Exception as exc:
            self._stats.image_errors += 1
            log.exception("%s: unexpected error resolving the image", ref)
            raise RegistryError(f"{ref}: resolving the image failed: {exc!r}") from exc
        old = self._images.get(ref)
        self._images[ref] = img
        if old is not None and old.manifest_bytes == img.manifest_bytes:
            img.all_started = old.all_started
        await self._records.save_image(img)
        return img
