"""Whole blobs a server sent when it was asked for a range, kept for the next reads.

A pull-through cache (Debian's docker-registry with ``proxy: remoteurl:``, for one)
answers a range request for a blob it has not cached yet with ``200`` and the whole blob,
and keeps doing so until its own copy is complete. The registry client takes the ranges
it asked for from such a body and keeps the body here, so that the following reads of
the same blob (the TOC after the footer, the files after the TOC) are served from memory
instead of making the cache stream the whole blob again, and fetch it again from its
origin while it is still filling.

Content-addressed (the blob digest is the key, whatever the repository or endpoint, like
the chunk store), bounded in bytes (least recently used out first) and in time. Nothing
here is trusted more than a registry answer: the layer code verifies what it decodes.

Concurrency: one event loop; no awaits inside.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class WholeBlobs:
    def __init__(
        self, max_bytes: int, keep_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.keep_s = keep_s
        self._clock = clock
        self._blobs: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # digest -> data, t
        self._bytes = 0

    def get(self, digest: str) -> bytes | None:
        item = self._blobs.get(digest)
        if item is None:
            return None
        data, stored = item
        if self._clock() - stored > self.keep_s:
            self._drop(digest)
            return None
        self._blobs.move_to_end(digest)
        return data

    def put(self, digest: str, data: bytes) -> bool:
        """Keep ``data`` (False when it alone exceeds the bound)."""
        if len(data) > self.max_bytes:
            return False
        if digest in self._blobs:
            self._drop(digest)
        while self._blobs and self._bytes + len(data) > self.max_bytes:
            self._drop(next(iter(self._blobs)))
        self._blobs[digest] = (data, self._clock())
        self._bytes += len(data)
        return True

    def _drop(self, digest: str) -> None:
        data, _ = self._blobs.pop(digest)
        self._bytes -= len(data)

    def __len__(self) -> int:
        return len(self._blobs)

    @property
    def bytes(self) -> int:
        return self._bytes
