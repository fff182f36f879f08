"""Materialising complete layers: when, with what budget, and what the filesystem answers.

Once every chunk of a layer is verified and in the chunk store (its background fetch
finished, or its files were read whole), the layer is extracted into a plain directory
under ``<state_dir>/layers`` (:mod:`alsd.layers.materialize`), in a worker thread at
the lowest priority, one layer at a time. From then on the layer's ``diff`` is answered
as a symbolic link to that directory, so that overlayfs mounts the next container's
lower directory from the local disk and never touches the FUSE mount; containers
started earlier keep their lower directory on the mount, and their reads are served
from the directory too. See developer-notes/materialize.md.

Disk: a directory's bytes count against the chunk store's ``max_bytes``
(``ChunkStore.hold_outside``); once it is built, the layer's chunks are the first the
store evicts. A directory is removed only to make room for another one, and only once
this process has seen its layer released: used, then its use count fell to zero and the
release grace passed (the layer was dropped from memory). A directory found at start
may be the lower directory of a container started before the restart (podman's use
counts are not persisted), so it stays until its layer is used and released again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from alsd.errors import AlsdError
from alsd.fetch.fetcher import ChunkStoreLike, Fetcher
from alsd.fetch.scheduler import Priority
from alsd.layers.materialize import LayerDirs, MaterializeError, Record, layer_key
from alsd.layers.model import Layer
from alsd.oci.layer_index import Chunk, LayerIndex

log = logging.getLogger(__name__)

# How often, at most, a layer whose background fetch is off is checked for completeness
# after a read fetched some of it (the check looks at every chunk of the layer).
_POKE_INTERVAL_S = 5.0


class MaterializeState(StrEnum):
    """Where materialisation of a layer stands (``materialized`` in /status)."""

    NO = "no"  # not every chunk is stored yet
    QUEUED = "queued"
    BUILDING = "building"
    YES = "yes"
    NO_ROOM = "no room"  # max_bytes cannot hold it; stays on FUSE
    FAILED = "failed"
    DISABLED = "disabled"  # [layers] materialize = false


class SpaceLike(Protocol):
    """The chunk store's budget, shared with the materialised directories."""

    async def hold_outside(self, size: int) -> bool: ...

    def release_outside(self, size: int) -> None: ...

    def demote(self, digests: Iterable[str]) -> None: ...

    def pinned(self, digest: str) -> AbstractContextManager[None]: ...


@dataclass
class _Entry:
    state: MaterializeState
    record: Record | None = None
    error: str = ""
    since: float = 0.0  # monotonic time of the first use seen (for the bench's figure)
    done_after_s: float | None = None
    counted: bool = True  # its bytes are held in the chunk store's budget


def _chunks(index: LayerIndex) -> Iterable[tuple[int, Chunk]]:
    for node in range(index.node_count()):
        for c in index.chunks(node):
            yield node, c


class _Source:
    """Chunks of one layer for the extractor: from the store, else fetched (verified)."""

    def __init__(self, layer: Layer, store: ChunkStoreLike, fetcher: Fetcher) -> None:
        self.layer = layer
        self.store = store
        self.fetcher = fetcher

    async def read_chunk(self, node: int, chunk: Chunk) -> bytes:
        data = await self.store.get(chunk.digest)
        if data is None:  # evicted since the check: fetch it again, verified
            got = await self.fetcher.get_chunks(
                self.layer.source, [(node, chunk)], Priority.BACKGROUND
            )
            data = got[chunk.digest]
        return data


class Materializer:
    def __init__(
        self,
        store: ChunkStoreLike,
        fetcher: Fetcher,
        dirs: LayerDirs | None = None,
        space: SpaceLike | None = None,
        *,
        link_prefix: str = "",
    ) -> None:
        """Without ``dirs`` and ``space`` (the chunk store's budget) materialisation is
        off and only :meth:`local_bytes` is of use. ``link_prefix``: what goes before
        ``<key>/diff`` in the symlink ``diff`` answers (relative to a layer directory of
        the mount, so that it resolves wherever the mount and state_dir are seen from
        together, e.g. in a chroot holding both)."""
        self.dirs = dirs if space is not None else None
        self._space = space
        self._store = store
        self._fetcher = fetcher
        self._link_prefix = link_prefix
        # TOC digests whose layers were released and dropped, and not used since.
        self._released: set[str] = set()
        self._entries: dict[str, _Entry] = {}  # by TOC digest
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sem = asyncio.Semaphore(1)
        self._last_poke: dict[str, float] = {}
        self._closed = False
        # Called on the event loop with the TOC digest of a layer that just got its
        # directory, and of one whose directory was just removed.
        self.on_ready: Callable[[str], None] | None = None
        self.on_removed: Callable[[str], None] | None = None
        self.built = 0
        self.removed = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.dirs is not None

    @property
    def _budget(self) -> SpaceLike:
        assert self._space is not None, "only used while materialisation is on"
        return self._space

    # ------------------------------------------------------------------ start / stop

    async def open(self) -> None:
        """Find the directories a previous run completed; remove half-built ones and those
        that fail a check (they are built again from chunks when the layer is complete)."""
        dirs = self.dirs
        if dirs is None:
            return
        found = await asyncio.to_thread(dirs.open)
        total = 0
        for rec in found.values():
            try:
                await asyncio.to_thread(dirs.check, rec.toc_digest)
            except MaterializeError as exc:
                log.warning("materialised layer %s fails a check (%s): removing it, it will "
                            "be built again from chunks", rec.toc_digest, exc)  # fmt: skip
                await asyncio.to_thread(dirs.remove, rec.toc_digest)
                continue
            self._entries[rec.toc_digest] = _Entry(MaterializeState.YES, rec)
            total += rec.file_bytes
            if not await self._budget.hold_outside(rec.file_bytes):
                # [cache] max_bytes was lowered: kept (a container may use it), uncounted.
                e = self._entries[rec.toc_digest]
                e.counted = False
                log.warning("materialised layer %s does not fit [cache] max_bytes",
                            rec.toc_digest)  # fmt: skip
        log.info("%d materialised layer(s), %d bytes", len(self._entries), total)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ queries

    def link_for(self, layer: Layer) -> str | None:
        """The symlink target ``diff`` answers for ``layer``, or None (serve the tree)."""
        e = self._entries.get(layer.index.toc_digest)
        if e is None or e.state is not MaterializeState.YES:
            return None
        return f"{self._link_prefix}/{layer_key(layer.index.toc_digest)}/diff"

    def tree(self, layer: Layer) -> Path | None:
        e = self._entries.get(layer.index.toc_digest)
        if self.dirs is None or e is None or e.state is not MaterializeState.YES:
            return None
        return self.dirs.tree(layer.index.toc_digest)

    def state(self, layer: Layer) -> _Entry:
        if self.dirs is None:
            return _Entry(MaterializeState.DISABLED)
        return self._entries.get(layer.index.toc_digest) or _Entry(MaterializeState.NO)

    def layer_status(self, layer: Layer) -> dict[str, object]:
        """The materialisation fields of a layer in /status."""
        e = self.state(layer)
        return {
            "materialized": e.state.value,
            "materialize_error": e.error,
            "materialized_after_s": e.done_after_s,
            "local_bytes": self.local_bytes(layer),
        }

    def stats(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "root": str(self.dirs.root) if self.dirs is not None else None,
            "layers": sum(e.state is MaterializeState.YES for e in self._entries.values()),
            "bytes": sum(
                e.record.file_bytes
                for e in self._entries.values()
                if e.state is MaterializeState.YES and e.record is not None
            ),
            "built": self.built,
            "removed": self.removed,
            "failed": self.failed,
        }

    def local_bytes(self, layer: Layer) -> int:
        """Uncompressed bytes of the layer's files that are on this machine."""
        e = self._entries.get(layer.index.toc_digest)
        if e is not None and e.record is not None and e.state is MaterializeState.YES:
            return e.record.file_bytes
        n = 0
        for _, c in _chunks(layer.index):
            if c.zeros or self._store.has(c.digest):
                n += c.size
        return n

    def complete(self, layer: Layer) -> bool:
        return all(c.zeros or self._store.has(c.digest) for _, c in _chunks(layer.index))

    # ------------------------------------------------------------------ triggers

    def first_use(self, layer: Layer) -> None:
        """A layer was looked up or used: its directory must stay; the clock of
        "first use to materialised" starts."""
        toc = layer.index.toc_digest
        self._released.discard(toc)
        e = self._entries.setdefault(toc, _Entry(MaterializeState.NO))
        if not e.since:
            e.since = time.monotonic()

    def released(self, toc_digest: str) -> None:
        """The manager dropped the last layer in memory with this TOC digest (use count
        zero for the release grace): its directory may go when room is needed."""
        self._released.add(toc_digest)

    def poke(self, layer: Layer) -> None:
        """A read fetched part of the layer: check now and then whether it is complete."""
        now = time.monotonic()
        toc = layer.index.toc_digest
        if now - self._last_poke.get(toc, 0.0) < _POKE_INTERVAL_S:
            return
        self._last_poke[toc] = now
        self.consider(layer)

    def consider(self, layer: Layer) -> None:
        """Materialise ``layer`` if every chunk is stored and it is not done or underway."""
        if self.dirs is None or self._closed:
            return
        toc = layer.index.toc_digest
        e = self._entries.setdefault(toc, _Entry(MaterializeState.NO))
        if e.state in (MaterializeState.YES, MaterializeState.QUEUED, MaterializeState.BUILDING):
            return
        if not self.complete(layer):
            return
        e.state = MaterializeState.QUEUED
        task = asyncio.get_running_loop().create_task(self._build(layer, e))
        self._tasks[toc] = task
        task.add_done_callback(lambda _t: self._tasks.pop(toc, None))

    async def _build(self, layer: Layer, e: _Entry) -> None:
        dirs = self.dirs
        assert dirs is not None
        toc = layer.index.toc_digest
        async with self._sem, contextlib.AsyncExitStack() as pins:
            # The layer's own chunks are the extraction's source: room is made elsewhere.
            for digest in {c.digest for _, c in _chunks(layer.index) if not c.zeros}:
                pins.enter_context(self._budget.pinned(digest))
            want = sum(
                layer.index.attr(n).size
                for n in range(layer.index.node_count())
                if layer.index.chunks(n)
            )
            if not await self._room_for(want, toc):
                e.state = MaterializeState.NO_ROOM
                log.info("%s: not materialised: no room under [cache] max_bytes", toc)
                return
            e.state = MaterializeState.BUILDING
            try:
                rec = await dirs.build(layer.index, _Source(layer, self._store, self._fetcher))
            except (AlsdError, OSError) as exc:
                self._budget.release_outside(want)
                self.failed += 1
                e.state, e.error = MaterializeState.FAILED, str(exc)
                log.warning("%s: materialisation failed: %s", layer.source.name, exc)
                return
            except BaseException:
                self._budget.release_outside(want)
                raise
        if rec.file_bytes != want:  # the index's sizes are the record's: never expected
            self._budget.release_outside(want)
            await self._budget.hold_outside(rec.file_bytes)
        e.state, e.record = MaterializeState.YES, rec
        if e.since:
            e.done_after_s = time.monotonic() - e.since
        self.built += 1
        # Its chunks are now duplicates: the first to go when the store needs room.
        self._budget.demote(c.digest for _, c in _chunks(layer.index))
        if self.on_ready is not None:
            self.on_ready(toc)

    async def _room_for(self, size: int, keep: str) -> bool:
        """Hold ``size`` bytes of the chunk store's budget, removing unused directories
        (never one a layer in memory or a mount uses) if the chunks cannot make room."""
        dirs = self.dirs
        assert dirs is not None
        while not await self._budget.hold_outside(size):
            victim = self._victim(keep)
            if victim is None:
                return False
            e = self._entries.pop(victim)
            self._released.discard(victim)
            await asyncio.to_thread(dirs.remove, victim)
            self.removed += 1
            if e.record is not None and e.counted:
                self._budget.release_outside(e.record.file_bytes)
            log.info("removed materialised layer %s to make room", victim)
            if self.on_removed is not None:
                self.on_removed(victim)
        return True

    def _victim(self, keep: str) -> str | None:
        dirs = self.dirs
        assert dirs is not None
        candidates = [
            (e.record.built_ns, toc)
            for toc, e in self._entries.items()
            if e.state is MaterializeState.YES
            and e.record is not None
            and toc != keep
            and toc in self._released
        ]
        return min(candidates)[1] if candidates else None


def relative_link_prefix(layers_root: Path, mountpoint: Path) -> str:
    """``../../<path of layers_root relative to mountpoint>``: from ``<mount>/<ref>/<digest>/``
    (where ``diff`` is) to ``layers_root``."""
    rel = os.path.relpath(os.path.realpath(layers_root), os.path.realpath(mountpoint))
    return f"../../{rel}"
