"""What the layer manager knows: images, layers, their states and its counters.

Plain data, no behaviour beyond small queries: the parts of alsd/layers (images,
resolver, reader, prefetch, manager) share these objects. A :class:`Layer` carries what
the filesystem and /status read; the tasks working on a layer belong to
:mod:`alsd.layers.prefetch`, its drop timer to :mod:`alsd.layers.manager` and its blob
read-ahead buffer to :mod:`alsd.layers.reader`, never to the layer itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from alsd.counters import ByteCounter
from alsd.fetch.fetcher import BlobSource, ByteStats
from alsd.oci.annotations import toc_digest_annotation
from alsd.oci.layer_index import LayerIndex
from alsd.oci.manifest import ImageConfig, Manifest


class PrefetchState(StrEnum):
    """Where the landmark prefetch of a layer stands (shown by /status)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    DISABLED = "disabled"  # [prefetch] landmark = false
    NO_LANDMARK = "no landmark"  # the layer has no prioritised region
    DISABLED_BY_LANDMARK = "disabled by landmark"  # .no.prefetch.landmark
    FAILED = "failed"
    CANCELLED = "cancelled"  # dropped from memory before it finished

    @property
    def active(self) -> bool:
        return self in (PrefetchState.PENDING, PrefetchState.RUNNING)


class BackgroundState(StrEnum):
    """Where the background fetch of a layer stands (shown by /status)."""

    PENDING = "pending"
    WAITING = "waiting"  # for the prefetch, the first read of the layer, a background slot
    RUNNING = "running"
    DONE = "done"
    DISABLED = "disabled"  # [prefetch] background = false
    TOO_LARGE = "skipped: layer too large"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (BackgroundState.PENDING, BackgroundState.WAITING, BackgroundState.RUNNING)


@dataclass(eq=False)
class Layer:
    """A resolved lazily pullable layer (one per (reference, blob digest) while in memory).

    Identity semantics (``eq=False``): two resolutions of the same layer are two objects.
    """

    ref: str
    blob_digest: str
    toc_digest: str
    index: LayerIndex
    layer_no: int  # inode namespace, unique over the manager's lifetime
    info_old: bytes  # b"" when this generation cannot be served (see layers/info.py)
    info_new: bytes
    diff_id: str
    compressed_size: int
    uncompressed_size: int | None
    position: int  # index of the layer in the manifest
    source: BlobSource
    use_count: int = 0
    prefetch_state: PrefetchState = PrefetchState.PENDING
    prefetch_error: str = ""  # why, when prefetch_state is FAILED
    background_state: BackgroundState = BackgroundState.PENDING
    background_error: str = ""
    from_metadata: bool = False
    image_digest: str = ""  # manifest digest of the image it was resolved through
    # Prefetch profile (layers/profiles.py): "none", "running", "done", "failed: ...";
    # how many entries and chunks it named, and the compressed bytes those cover.
    profile_state: str = "pending"
    profile_entries: int = 0
    profile_chunks: int = 0
    profile_bytes: int = 0
    # Digests of the chunks the profile prefetch fetches (the reader's read-ahead skips
    # misses on them while it runs: they are on their way, in the order they are read).
    profile_digests: frozenset[str] = frozenset()
    # Once the layer is materialised (layers/materializer.py): the target of the symlink
    # ``diff`` answers, and the directory its files are read from.
    diff_link: str | None = None
    local_tree: Path | None = None

    @property
    def format(self) -> str:
        return str(self.index.format)

    @property
    def stats(self) -> ByteStats:
        return self.source.stats

    @property
    def counter(self) -> ByteCounter:
        return self.source.counter

    @property
    def key(self) -> tuple[str, str]:
        return (self.ref, self.blob_digest)

    def prefetch_status(self) -> str:
        """The prefetch state as /status shows it (``failed: <why>`` for a failure)."""
        return _with_error(self.prefetch_state, self.prefetch_error)

    def background_status(self) -> str:
        return _with_error(self.background_state, self.background_error)


def _with_error(state: StrEnum, error: str) -> str:
    return f"{state.value}: {error}" if state.value == "failed" else state.value


@dataclass
class Image:
    """A resolved image: its manifest (one platform) and config, as served and parsed."""

    ref: str
    manifest_bytes: bytes
    config_bytes: bytes
    manifest: Manifest
    config: ImageConfig
    resolved_at: float  # wall clock (time.time()), survives restarts
    all_started: bool = False  # the resolution of all its layers has been started
    _digest: str = ""

    @property
    def digest(self) -> str:
        """The manifest digest (sha256 of the manifest bytes as served)."""
        if not self._digest:
            self._digest = "sha256:" + hashlib.sha256(self.manifest_bytes).hexdigest()
        return self._digest

    def position_of(self, digest: str) -> int | None:
        """Index of the layer whose blob digest, else whose TOC digest, is ``digest``."""
        for i, d in enumerate(self.manifest.layers):
            if d.digest == digest:
                return i
        for i, d in enumerate(self.manifest.layers):
            if toc_digest_annotation(d.annotations) == digest:
                return i
        return None


@dataclass
class LayerStats:
    """The layer manager's counters (the ``engine`` section of /status)."""

    image_resolves: int = 0
    image_errors: int = 0
    layer_resolves: int = 0
    layer_errors: int = 0
    layers_from_metadata: int = 0
    negative_hits: int = 0
    resolve_timeouts: int = 0
    resolve_requests: int = 0  # range reads for footers/TOCs/tar-splits
    resolve_bytes: int = 0
    blob_requests: int = 0
    blob_bytes: int = 0
    reads: int = 0
    reads_fetched: int = 0  # reads that found a chunk missing and fetched it first
    read_bytes: int = 0
    read_errors: int = 0
    read_latency_sum_s: float = 0.0
    readahead_requests: int = 0  # read-ahead fetches started (each one request or fewer)
    readahead_errors: int = 0
    metadata_discarded: int = 0

    def as_dict(self) -> dict[str, int | float]:
        return dict(vars(self))
