"""Counters shared by the registry client, the fetcher and the layer manager.

A :class:`ByteCounter` counts the HTTP requests and body bytes spent on behalf of one
owner and adds them into its parent too (layer -> manager), so that /status can report
them per layer and in total. It lives outside the registry package so that counting
bytes does not require importing the HTTP client.

Pure and synchronous; only touched on the event loop.
"""

from __future__ import annotations


class ByteCounter:
    """Counts body bytes received; a counter adds into its parent too (layer -> image).

    ``requests`` counts HTTP requests sent on its behalf.
    """

    __slots__ = ("bytes", "parent", "requests")

    def __init__(self, parent: ByteCounter | None = None) -> None:
        self.bytes = 0
        self.requests = 0
        self.parent = parent

    def add(self, n: int) -> None:
        c: ByteCounter | None = self
        while c is not None:
            c.bytes += n
            c = c.parent

    def add_request(self) -> None:
        c: ByteCounter | None = self
        while c is not None:
            c.requests += 1
            c = c.parent

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes}
