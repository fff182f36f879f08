"""Learned prefetch profiles: record what an image's containers read first, use it next time.

:class:`ProfileBook` keeps, per image (manifest digest), a profile
(:mod:`alsd.oci.profile`): per layer blob digest, the regular files read in the first
``window_s`` seconds after the layer's first read through that image, in first-read
order, each with the offset and length of its first read, at most ``max_files`` per
layer. Each run's recording is merged into what earlier runs recorded (first-seen
order) and persisted through the metadata store when the layer's window closes (and on
close), so it survives restarts.

When a layer is resolved, :meth:`ProfileBook.entries_for` gives the entries to prefetch
first: the image's own recording, then a profile found in the registry for the image
(looked up by :meth:`start_lookup` as soon as the image is first asked for, concurrently
with the TOC fetches), else a recording of another image sharing the layer. Entries are
checked against the layer's verified index; each problem is logged once. A profile only
changes what is fetched first, never what a file contains.

Knows nothing of FUSE or HTTP: the registry lookup is a callable given by the wiring.
Concurrency rule: event loop thread only; state changes happen between awaits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from alsd.errors import AlsdError
from alsd.layers.ports import MetadataLike
from alsd.oci.layer_index import LayerIndex
from alsd.oci.profile import (
    DEFAULT_LIMITS,
    LayerProfile,
    Profile,
    ProfileEntry,
    ProfileLimits,
    check_against_image,
    merge_profiles,
    parse_profile,
    serialize_profile,
)

log = logging.getLogger(__name__)

PROFILE_KIND = "profile"
_RECORD_VERSION = 1

#: ``lookup(ref, image_digest)``: the registry's profile for the image, None if it has none.
Lookup = Callable[[str, str], Awaitable[Profile | None]]


@dataclass
class ProfileStats:
    recorded_entries: int = 0  # entries added by recordings (before merging)
    saves: int = 0
    save_errors: int = 0
    lookups: int = 0  # registry lookups started
    lookups_found: int = 0
    lookup_errors: int = 0  # lookups that failed or found only unusable profiles
    problems: int = 0  # problems logged (one line each)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Recording:
    image: str
    layer: str
    started: float
    entries: list[ProfileEntry] = field(default_factory=list)
    nodes: dict[int, int] = field(default_factory=dict)  # node -> position in entries
    closed: bool = False


@dataclass
class _Lookup:
    task: asyncio.Task[Profile | None]
    expires: float  # monotonic; a finished lookup is reused until then
    layers: frozenset[str]


def profile_record(ref: str, profile: Profile) -> dict[str, Any]:
    """The metadata record of a stored profile (the document itself, re-parsed on load)."""
    return {"v": _RECORD_VERSION, "ref": ref, "doc": serialize_profile(profile)}


def profile_from_record(rec: Any, limits: ProfileLimits = DEFAULT_LIMITS) -> tuple[str, Profile]:
    """(ref, profile) of a record; ValueError/FormatError when it is not one."""
    if not isinstance(rec, dict) or rec.get("v") != _RECORD_VERSION:
        raise ValueError("not a profile record of this version")
    ref, doc = rec.get("ref"), rec.get("doc")
    if not isinstance(ref, str) or not isinstance(doc, bytes):
        raise ValueError("malformed profile record")
    return ref, parse_profile(doc, limits)


class ProfileBook:
    """See the module docstring."""

    def __init__(
        self,
        metadata: MetadataLike | None,
        *,
        record: bool = True,
        use: bool = True,
        window_s: float = 10.0,
        max_files: int = 1024,
        limits: ProfileLimits = DEFAULT_LIMITS,
        lookup: Lookup | None = None,
        lookup_wait_s: float = 5.0,
        negative_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metadata = metadata
        self.record = record
        self.use = use
        self.window_s = window_s
        self.max_files = max_files
        self.limits = limits
        self._lookup = lookup
        self.lookup_wait_s = lookup_wait_s
        self.negative_ttl_s = negative_ttl_s
        self._clock = clock
        self.stats = ProfileStats()
        self._stored: dict[str, Profile] = {}  # image digest -> merged recordings
        self._refs: dict[str, str] = {}  # image digest -> a reference it was seen under
        self._recordings: dict[tuple[str, str], _Recording] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._logged: set[tuple[str, str]] = set()  # (source, message) logged once
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ================================================================ persistence

    async def load(self) -> None:
        if self._metadata is None:
            return
        for key, rec in await self._metadata.list_async(PROFILE_KIND):
            try:
                ref, profile = profile_from_record(rec, self.limits)
            except (AlsdError, ValueError) as exc:
                log.warning("discarding stored profile %r: %s", key, exc)
                await self._metadata.delete_async(PROFILE_KIND, key)
                continue
            self._stored[key] = profile
            self._refs[key] = ref
        if self._stored:
            log.info("loaded %d prefetch profile(s) from metadata", len(self._stored))

    def stored(self, image: str) -> Profile | None:
        return self._stored.get(image)

    async def _save(self, image: str) -> None:
        profile = self._stored.get(image)
        if self._metadata is None or profile is None:
            return
        try:
            await self._metadata.save_async(
                PROFILE_KIND, image, profile_record(self._refs.get(image, ""), profile)
            )
            self.stats.saves += 1
        except AlsdError as exc:
            self.stats.save_errors += 1
            log.warning("cannot save the prefetch profile of %s: %s", image, exc)

    async def close(self) -> None:
        """Merge and save what is being recorded; stop lookups."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        for lk in self._lookups.values():
            lk.task.cancel()
        await asyncio.gather(*self._tasks, *(lk.task for lk in self._lookups.values()),
                             return_exceptions=True)  # fmt: skip
        images = {rec.image for rec in self._recordings.values() if not rec.closed}
        for rec in self._recordings.values():
            self._merge(rec)
        for image in images:
            await self._save(image)

    # ================================================================ recording

    def note_read(
        self,
        ref: str,
        image: str,
        layer: str,
        index: LayerIndex,
        node: int,
        offset: int,
        length: int,
    ) -> None:
        """A read of file ``node`` of ``layer`` through image ``image`` (manifest digest).

        A file's entry keeps the offset of its first read; its length grows to cover the
        later reads of the window that end beyond it (a library's header, then the pages
        the loader maps).
        """
        if not self.record or self._closed or length <= 0:
            return
        key = (image, layer)
        rec = self._recordings.get(key)
        now = self._clock()
        if rec is None:
            rec = self._recordings[key] = _Recording(image, layer, now)
            self._refs.setdefault(image, ref)
            self._spawn(self._close_later(rec))
        if rec.closed or now - rec.started > self.window_s:
            return
        at = rec.nodes.get(node)
        if at is not None:
            e = rec.entries[at]
            if offset + length > e.offset + e.length and offset >= e.offset:
                rec.entries[at] = ProfileEntry(e.path, e.offset, offset + length - e.offset)
            return
        if len(rec.entries) >= self.max_files:
            return
        rec.nodes[node] = len(rec.entries)
        rec.entries.append(ProfileEntry(index.path(node), offset, length))
        self.stats.recorded_entries += 1

    async def _close_later(self, rec: _Recording) -> None:
        await asyncio.sleep(self.window_s)
        self._merge(rec)
        await self._save(rec.image)

    def _merge(self, rec: _Recording) -> None:
        if rec.closed:
            return
        rec.closed = True
        if not rec.entries:
            return
        limits = ProfileLimits(
            max_bytes=self.limits.max_bytes,
            max_layers=self.limits.max_layers,
            max_entries=min(self.limits.max_entries, self.max_files),
            max_path_bytes=self.limits.max_path_bytes,
        )
        run = Profile((LayerProfile(rec.layer, tuple(rec.entries)),))
        self._stored[rec.image] = merge_profiles(
            self._stored.get(rec.image, Profile()), run, limits
        )

    async def flush(self) -> None:
        """Close every open recording now, merge and save it (tests, shutdown)."""
        images = set()
        for rec in self._recordings.values():
            if not rec.closed:
                images.add(rec.image)
                self._merge(rec)
        for image in images:
            await self._save(image)

    def layer_dropped(self, image: str, layer: str) -> None:
        """The layer left memory: its next use is a new run, recorded afresh."""
        rec = self._recordings.get((image, layer))
        if rec is not None and rec.closed:
            del self._recordings[(image, layer)]

    # ================================================================ registry lookup

    def start_lookup(self, ref: str, image: str, layers: Iterable[str]) -> None:
        """Look for the image's profile in the registry, unless known or looked up lately."""
        if not self.use or self._lookup is None or self._closed:
            return
        lk = self._lookups.get(image)
        if lk is not None and (not lk.task.done() or self._clock() < lk.expires):
            return
        self.stats.lookups += 1
        task = asyncio.get_running_loop().create_task(self._run_lookup(ref, image))
        self._lookups[image] = _Lookup(task, float("inf"), frozenset(layers))

        def done(t: asyncio.Task[Profile | None]) -> None:
            cur = self._lookups.get(image)
            if cur is not None and cur.task is t:
                cur.expires = self._clock() + self.negative_ttl_s

        task.add_done_callback(done)

    async def _run_lookup(self, ref: str, image: str) -> Profile | None:
        assert self._lookup is not None
        try:
            found = await self._lookup(ref, image)
        except AlsdError as exc:
            self.stats.lookup_errors += 1
            self._problem(image, f"{ref}: registry prefetch profile ignored: {exc}")
            return None
        except Exception as exc:
            self.stats.lookup_errors += 1
            log.exception("%s: unexpected error looking up the prefetch profile", ref)
            raise AlsdError(f"{ref}: profile lookup failed: {exc!r}") from exc
        if found is None:
            return None
        self.stats.lookups_found += 1
        lk = self._lookups.get(image)
        layers = lk.layers if lk is not None else frozenset()
        for lp in found.layers:
            if lp.digest not in layers:
                self._problem(
                    image,
                    f"{ref}: registry prefetch profile names layer {lp.digest}, not a layer "
                    "of this image; ignored",
                )
        return Profile(tuple(lp for lp in found.layers if lp.digest in layers))

    async def _remote(self, image: str) -> Profile | None:
        lk = self._lookups.get(image)
        if lk is None:
            return None
        try:
            async with asyncio.timeout(self.lookup_wait_s):
                return await asyncio.shield(lk.task)
        except TimeoutError:
            self._problem(image, f"{image}: registry prefetch profile lookup still running; "
                          "prefetching without it")  # fmt: skip
            return None
        except AlsdError:
            return None

    # ================================================================ use

    async def entries_for(
        self, ref: str, image: str, layer: str, index: LayerIndex
    ) -> list[ProfileEntry]:
        """What to prefetch first for ``layer`` of ``image``, checked against ``index``."""
        if not self.use or self._closed:
            return []
        parts: list[tuple[str, LayerProfile]] = []
        own = self._stored.get(image)
        lp = own.layer(layer) if own is not None else None
        if lp is not None:
            parts.append(("recorded", lp))
        remote = await self._remote(image)
        lp = remote.layer(layer) if remote is not None else None
        if lp is not None:
            parts.append(("registry", lp))
        if not parts:
            # Another image sharing this layer was recorded on this host.
            for other, profile in self._stored.items():
                lp = profile.layer(layer)
                if other != image and lp is not None:
                    parts.append((f"recorded for {other}", lp))
                    break
        if not parts:
            return []
        merged = Profile()
        for source, lp in parts:
            checked, problems = check_against_image(Profile((lp,)), {layer: index})
            for p in problems:
                self._problem(f"{source}:{image}", f"{ref}: {source} prefetch profile: {p.message}")
            merged = merge_profiles(merged, checked, self.limits)
        got = merged.layer(layer)
        return list(got.entries) if got is not None else []

    # ================================================================ helpers

    def _problem(self, source: str, message: str) -> None:
        key = (source, message)
        if key in self._logged:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged.add(key)
        self.stats.problems += 1
        log.warning("%s", message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self) -> Mapping[str, Any]:
        return {
            **self.stats.as_dict(),
            "stored_profiles": len(self._stored),
            "recording": sum(1 for r in self._recordings.values() if not r.closed),
        }
