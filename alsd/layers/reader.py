"""The read path: bytes of a file of a layer, and raw bytes of its blob.

A file read takes the chunks of the byte range from the chunk store when all are there
(reading only the requested slice of each); otherwise through the
:class:`~alsd.fetch.fetcher.Fetcher` (coalesced, verified range reads). A read that has
to go to the registry also reads ahead: the ``readahead_bytes`` of the blob that follow
it are fetched in a request of their own (files next to each other in a layer tend to
be read together: a package's modules, a library and its data).

Every file read is also noted in the image's prefetch profile recording
(:mod:`alsd.layers.profiles`), which keeps the first reads of each layer's first seconds.

Blob reads (the ``blob`` file, read by exports) fetch ``blob_readahead_bytes`` at a time
and keep the last piece per layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from alsd.config import LayerSettings
from alsd.errors import AlsdError, FormatError, IntegrityError, RegistryError
from alsd.fetch.fetcher import ChunkStoreLike, Fetcher
from alsd.fetch.scheduler import Priority, Scheduler
from alsd.layers.model import Layer, LayerStats, PrefetchState
from alsd.layers.ports import RegistryLike
from alsd.layers.prefetch import LayerTasks
from alsd.layers.profiles import ProfileBook
from alsd.oci.layer_index import Chunk, EntryKind

log = logging.getLogger(__name__)


class Reader:
    def __init__(
        self,
        registry: RegistryLike,
        fetcher: Fetcher,
        store: ChunkStoreLike,
        scheduler: Scheduler,
        tasks: LayerTasks,
        settings: LayerSettings,
        stats: LayerStats,
        profiles: ProfileBook | None = None,
    ) -> None:
        self._registry = registry
        self._fetcher = fetcher
        self._store = store
        self._scheduler = scheduler
        self._tasks = tasks
        self._settings = settings
        self._stats = stats
        self._profiles = profiles
        # The last piece of each layer's blob read (exports read in small pieces).
        self._blob_cache: dict[Layer, tuple[int, bytes]] = {}
        self.closed = False
        # Called after a read had to fetch (the layer may be complete now).
        self.on_fetched: Callable[[Layer], None] | None = None
        self.local_reads = 0
        self.local_read_errors = 0

    def forget(self, layer: Layer) -> None:
        self._blob_cache.pop(layer, None)

    async def read(self, layer: Layer, node: int, offset: int, size: int) -> bytes:
        """Exactly the bytes ``[offset, offset+size)`` of file ``node`` (short at EOF)."""
        attr = layer.index.attr(node)
        if attr.kind != EntryKind.REG or size <= 0 or offset < 0 or offset >= attr.size:
            return b""
        end = min(attr.size, offset + size)
        if self._profiles is not None:
            # What a container reads first, in order: its image's prefetch profile.
            self._profiles.note_read(
                layer.ref, layer.image_digest, layer.blob_digest, layer.index, node,
                offset, end - offset,
            )  # fmt: skip
        chunks = layer.index.chunks_in_range(node, offset, end - offset)
        self._stats.reads += 1
        t0 = time.monotonic()
        try:
            out = None
            if layer.local_tree is not None:
                out = await self._read_local(layer, layer.local_tree, node, offset, end)
            if out is None:
                out = await self._read_stored(layer, node, chunks, offset, end)
            if out is None:
                self._stats.reads_fetched += 1
                with self._scheduler.demand():
                    fetch = self._fetcher.get_chunks(
                        layer.source, [(node, c) for c in chunks], Priority.DEMAND
                    )
                    # The read-ahead task runs after this read has registered its chunks
                    # and before the fetcher flushes them: both requests go out together.
                    self._read_ahead(layer, node, chunks, to_eof=end >= attr.size)
                    got = await fetch
                out = _assemble(layer, node, chunks, got, offset, end)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "miss %s %s@%d+%d: %d chunk(s), %.1f ms", layer.source.name,
                        layer.index.path(node), offset, end - offset, len(chunks),
                        (time.monotonic() - t0) * 1e3,
                    )  # fmt: skip
                if self.on_fetched is not None:
                    self.on_fetched(layer)
        except AlsdError:
            self._stats.read_errors += 1
            raise
        finally:
            self._stats.read_latency_sum_s += time.monotonic() - t0
        self._stats.read_bytes += len(out)
        layer.source.stats.bytes_served += len(out)
        return out

    def _read_ahead(
        self, layer: Layer, node: int, chunks: Sequence[Chunk], *, to_eof: bool
    ) -> None:
        """Start fetching the files that follow ``node`` in its directory, up to
        ``readahead_bytes`` of the blob after ``chunks``.

        Called when a read misses the store. A file read to its end is typically a small
        file read whole (a Python module, a configuration file), and the files after it in
        the layer (tar order) are its neighbours in the directory, which a starting program
        tends to read next (the other modules of a package). They are fetched in a request
        of their own, at prefetch priority, so the read that missed is not delayed by them;
        a later read of one of them joins the fetch in flight. Nothing is read ahead

        * after a read that stops short of the end of its file (a program or library
          mapped, a large file read in pieces): the kernel's own read-ahead asks for the
          rest of that file, and the files after it are no likelier to be read than others;
        * beyond the directory of ``node``: the next directory is another package;
        * inside the prioritised region of an optimised layer, which the landmark prefetch
          fetches (or has fetched) whole;
        * for chunks the running profile prefetch fetches: they, and what the container
          reads next, are on their way in the profile's order.

        Errors only cost the read-ahead (the chunks are fetched again when read).
        """
        n = self._settings.readahead_bytes
        if n <= 0 or not chunks or not to_eof or self.closed:
            return
        end = max(c.fetch_end for c in chunks)
        idx = layer.index
        state = layer.prefetch_state
        if end <= idx.prefetch_end and (state.active or state == PrefetchState.DONE):
            return
        if layer.profile_state == "running" and all(
            c.digest in layer.profile_digests for c in chunks
        ):
            # The profile prefetch is fetching these, and what the container reads next.
            return
        directory = idx.parent(node)
        limit = end + n
        ahead: list[tuple[int, Chunk]] = []
        for nd, c in idx.iter_chunks(end):
            if c.fetch_end > limit or idx.parent(nd) != directory:
                break
            if not c.zeros and not self._store.has(c.digest):
                ahead.append((nd, c))
        if not ahead:
            return
        self._stats.readahead_requests += 1
        self._tasks.spawn(layer, self._fetch_ahead(layer, ahead))

    async def _fetch_ahead(self, layer: Layer, ahead: list[tuple[int, Chunk]]) -> None:
        n = self._settings.readahead_bytes
        try:
            await self._fetcher.get_chunks(
                layer.source, ahead, Priority.PREFETCH, keep=False,
                merge_gap_bytes=n, max_request_bytes=n,
            )  # fmt: skip
        except AlsdError as exc:
            # The fetcher logged it; a later read fetches those chunks itself.
            self._stats.readahead_errors += 1
            log.debug("%s: read-ahead failed: %s", layer.source.name, exc)

    async def _read_local(
        self, layer: Layer, tree: Path, node: int, offset: int, end: int
    ) -> bytes | None:
        """``[offset, end)`` from the layer's materialised directory (a container started
        before materialisation still reads through FUSE); None if that fails."""
        path = tree / layer.index.path(node)
        try:
            data = await asyncio.to_thread(_pread_file, path, offset, end - offset)
        except OSError as exc:
            self.local_read_errors += 1
            log.warning("%s: reading %s failed (%s); reading its chunks instead",
                        layer.source.name, path, exc)  # fmt: skip
            return None
        if len(data) != end - offset:
            self.local_read_errors += 1
            log.warning("%s: %s is shorter than the TOC says; reading its chunks instead",
                        layer.source.name, path)  # fmt: skip
            return None
        self.local_reads += 1
        return data

    async def _read_stored(
        self, layer: Layer, node: int, chunks: Sequence[Chunk], offset: int, end: int
    ) -> bytes | None:
        """``[offset, end)`` when every chunk is in the chunk store, reading only the
        requested slice of each; None otherwise. Does not count as on-demand activity for
        the scheduler: nothing is fetched."""
        wanted: list[tuple[Chunk, int, int]] = []
        pos = offset
        for c in chunks:
            c_end = c.file_offset + c.size
            if c_end <= pos:
                continue
            if c.file_offset > pos:
                return None  # a hole in the chunk list: let _assemble report it
            hi = min(end, c_end)
            wanted.append((c, pos - c.file_offset, hi - c.file_offset))
            pos = hi
            if pos >= end:
                break
        if pos != end:
            return None
        parts = await self._fetcher.get_stored_slices(wanted)
        if parts is None:
            return None
        last, lo, _ = wanted[-1]
        if lo == 0:
            # Reading a chunk from its start: a sequential reader will want the file's
            # next chunk soon, so let the disk fetch it meanwhile.
            self._fetcher.advise_next(layer.index.chunks(node), last)
        for (c, lo, hi), part in zip(wanted, parts, strict=True):
            if len(part) != hi - lo:
                # A stored chunk shorter than the TOC says: same error as the general path.
                raise IntegrityError(
                    f"{layer.source.name}: {layer.index.path(node)}@{c.file_offset}: chunk "
                    f"has fewer bytes than the TOC says ({c.size})"
                )
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_blob(self, layer: Layer, offset: int, size: int) -> bytes:
        """Raw compressed bytes of the layer blob (for the ``blob`` file)."""
        total = layer.compressed_size
        if size <= 0 or offset < 0 or offset >= total:
            return b""
        end = min(total, offset + size)
        cached = self._blob_cache.get(layer)
        if cached is not None and cached[0] <= offset and end <= cached[0] + len(cached[1]):
            start = offset - cached[0]
            return cached[1][start : start + end - offset]
        # Exports read sequentially in small pieces: fetch ahead and keep the last piece.
        fetch_end = min(total, max(end, offset + self._settings.blob_readahead_bytes))
        with self._scheduler.demand():
            async with self._scheduler.slot(Priority.DEMAND):
                self._stats.blob_requests += 1
                (body,) = await self._registry.read_ranges(
                    layer.source.ref,
                    layer.blob_digest,
                    [(offset, fetch_end)],
                    counter=layer.source.counter,
                )
        if len(body) != fetch_end - offset:
            raise RegistryError(f"{layer.source.name}: short blob read at {offset}")
        self._stats.blob_bytes += len(body)
        layer.source.stats.bytes_fetched += len(body)
        self._blob_cache[layer] = (offset, body)
        return body[: end - offset]


def _pread_file(path: Path, offset: int, size: int) -> bytes:
    # The directory is alsd's own (0700 from state_dir down): O_NOFOLLOW is a last guard.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        parts: list[bytes] = []
        got = 0
        while got < size:
            part = os.pread(fd, size - got, offset + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def _assemble(
    layer: Layer,
    node: int,
    chunks: Sequence[Chunk],
    got: Mapping[str, bytes],
    offset: int,
    end: int,
) -> bytes:
    out = bytearray()
    pos = offset
    for c in chunks:
        if c.file_offset + c.size <= pos:
            continue
        if c.file_offset > pos:
            break
        hi = min(end, c.file_offset + c.size)
        if c.zeros:  # a hole: only the zero bytes read, however large the chunk
            out += bytes(hi - pos)
            pos = hi
            if pos >= end:
                break
            continue
        data = got[c.digest]
        if len(data) != c.size:
            raise IntegrityError(
                f"{layer.source.name}: {layer.index.path(node)}@{c.file_offset}: chunk has "
                f"{len(data)} bytes, TOC says {c.size}"
            )
        out += data[pos - c.file_offset : hi - c.file_offset]
        pos = hi
        if pos >= end:
            break
    if pos != end:
        raise FormatError(
            f"{layer.source.name}: {layer.index.path(node)}: chunks do not cover "
            f"[{offset}, {end}) (stopped at {pos})"
        )
    return bytes(out)
