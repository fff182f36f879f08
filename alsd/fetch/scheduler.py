"""Priorities between on-demand reads, landmark prefetch and background fetch.

Three strictly ordered priorities share the registry connection budget:

1. ``DEMAND``     - reads the filesystem is waiting for;
2. ``PREFETCH``   - the prioritised region ``[0, prefetch_end)`` of each layer;
3. ``BACKGROUND`` - the rest of each layer.

Two mechanisms enforce the order:

* :meth:`Scheduler.slot` is a priority semaphore over ``fetch_concurrency`` request slots:
  a freed slot always goes to the best waiting priority (FIFO within one priority).
* :meth:`Scheduler.wait_quiet` lets background work start a new batch only when no
  on-demand read is running, none has ended (and no read was answered, :meth:`touch`)
  for ``quiet_period_s`` and no prefetch runs.
  Background work therefore pauses while reads run and resumes after a quiet period.

Concurrency rule: everything here runs on the event loop thread; the counters and the
waiter heap are only changed between awaits, so no lock is needed (see
developer-notes/concurrency.md).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from enum import IntEnum
from typing import Any


class Priority(IntEnum):
    """Lower value = served first."""

    DEMAND = 0
    PREFETCH = 1
    BACKGROUND = 2


class Scheduler:
    """Priority request slots plus the "is it quiet?" signal for background work."""

    def __init__(
        self,
        fetch_concurrency: int = 4,
        *,
        quiet_period_s: float = 2.0,
        background_concurrency: int = 1,
    ) -> None:
        if fetch_concurrency < 1:
            raise ValueError("fetch_concurrency must be >= 1")
        self._free = fetch_concurrency
        self.capacity = fetch_concurrency
        self.quiet_period_s = quiet_period_s
        # (priority, sequence, future); sequence keeps FIFO order within a priority.
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._demand_active = 0
        self._prefetch_active = 0
        self._last_demand_end = -1e18
        self._changed: asyncio.Event | None = None
        self._background = asyncio.Semaphore(max(1, background_concurrency))
        self.granted: dict[Priority, int] = dict.fromkeys(Priority, 0)

    # ---- request slots -------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        """Hold one of the ``fetch_concurrency`` request slots for ``priority``."""
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: Priority) -> None:
        if self._free > 0 and not self._has_waiter_at_or_above(priority):
            self._free -= 1
            self.granted[priority] += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release()
            else:
                fut.cancel()
            raise
        self.granted[priority] += 1

    def _has_waiter_at_or_above(self, priority: Priority) -> bool:
        return any(p <= priority and not f.done() for p, _, f in self._waiters)

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                # Hand the slot over directly: _free stays unchanged, so no newcomer of a
                # lower priority can slip in between.
                fut.set_result(None)
                return
        self._free += 1

    @property
    def free_slots(self) -> int:
        return self._free

    def waiting(self) -> dict[str, int]:
        counts = {p.name.lower(): 0 for p in Priority}
        for p, _, f in self._waiters:
            if not f.done():
                counts[Priority(p).name.lower()] += 1
        return counts

    # ---- activity tracking ---------------------------------------------------------

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        ev = self._event()
        ev.set()
        # A fresh event for the next wait; waiters of the old one have been woken.
        self._changed = asyncio.Event()

    @contextmanager
    def demand(self) -> Iterator[None]:
        """Mark an on-demand read as running (background work pauses meanwhile)."""
        self._demand_active += 1
        self._notify()
        try:
            yield
        finally:
            self._demand_active -= 1
            self._last_demand_end = asyncio.get_running_loop().time()
            self._notify()

    @contextmanager
    def prefetching(self) -> Iterator[None]:
        """Mark a prefetch as running (background work waits for all prefetches)."""
        self._prefetch_active += 1
        self._notify()
        try:
            yield
        finally:
            self._prefetch_active -= 1
            self._notify()

    def touch(self) -> None:
        """A read was answered (from the store or not): background work waits another
        quiet period. Reads that hit the store fetch nothing, but they say a container is
        running, and a background batch would only take the link from its next miss."""
        self._last_demand_end = max(self._last_demand_end, asyncio.get_running_loop().time())

    @property
    def demand_active(self) -> int:
        return self._demand_active

    @property
    def prefetch_active(self) -> int:
        return self._prefetch_active

    async def wait_quiet(self) -> None:
        """Return once no read or prefetch runs and no read ended in the quiet period."""
        loop = asyncio.get_running_loop()
        while True:
            if self._demand_active == 0 and self._prefetch_active == 0:
                remaining = self._last_demand_end + self.quiet_period_s - loop.time()
                if remaining <= 0:
                    return
            else:
                remaining = None
            ev = self._event()
            with suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout=remaining)

    @asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Bound how many layers fetch in the background at the same time."""
        async with self._background:
            yield

    def status(self) -> dict[str, Any]:
        return {
            "fetch_slots": self.capacity,
            "free_slots": self._free,
            "waiting": self.waiting(),
            "granted": {p.name.lower(): n for p, n in self.granted.items()},
            "demand_active": self._demand_active,
            "prefetch_active": self._prefetch_active,
        }
