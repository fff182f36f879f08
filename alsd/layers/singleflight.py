"""One resolution per key at a time, and failures remembered for a while.

Both images (keyed by reference) and layers (keyed by (reference, blob digest)) are
resolved this way: the first caller starts a task, later callers wait for the same task;
a task is detached from its callers (they wait through ``asyncio.shield``), so a caller
that times out or is interrupted does not abort a resolution others wait for; an
:class:`~alsd.errors.AlsdError` it ends with is remembered in a :class:`NegativeCache`
for ``ttl_s`` so that the next callers get it at once.

Only used on the event loop thread; no locks: checking and registering a task happen
without an await in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from alsd.errors import AlsdError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Beyond this many remembered failures, expired ones are swept on the next insert.
_SWEEP_ABOVE = 10_000


def fresh(exc: AlsdError) -> AlsdError:
    """A new exception like ``exc`` (re-raising one instance piles up tracebacks)."""
    try:
        new = type(exc)(*exc.args)
    except TypeError:
        new = AlsdError(*exc.args)
    return new


class NegativeCache(Generic[K]):
    """Failures per key, each forgotten ``ttl_s`` after it happened (0: never kept)."""

    def __init__(self, ttl_s: float, on_hit: Callable[[], None] | None = None) -> None:
        self.ttl_s = ttl_s
        self._on_hit = on_hit
        self._entries: dict[K, tuple[AlsdError, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> AlsdError | None:
        """A fresh copy of the remembered failure of ``key``, if it has not expired."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        exc, expires = hit
        if time.monotonic() >= expires:
            del self._entries[key]
            return None
        return fresh(exc)

    def check(self, key: K) -> None:
        """Raise the remembered failure of ``key`` (counted as a hit), if any."""
        exc = self.get(key)
        if exc is not None:
            if self._on_hit is not None:
                self._on_hit()
            raise exc

    def remember(self, key: K, exc: AlsdError) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        if len(self._entries) > _SWEEP_ABOVE:
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
        self._entries[key] = (exc, now + self.ttl_s)


class SingleFlight(Generic[K, V]):
    """The running resolutions, one task per key (see the module docstring)."""

    def __init__(self, negative: NegativeCache[Any]) -> None:
        self._negative = negative
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def get(self, key: K) -> asyncio.Task[V] | None:
        return self._tasks.get(key)

    def start(
        self,
        key: K,
        coro: Callable[[], Coroutine[Any, Any, V]],
        *,
        on_result: Callable[[V], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> asyncio.Task[V]:
        """The task resolving ``key``: the running one, else a new one running ``coro()``.

        When the new task ends: ``on_end()`` (if it was still the key's task), then
        ``on_result(value)`` on success or, on an AlsdError, the failure is remembered.
        """
        task = self._tasks.get(key)
        if task is not None:
            return task
        task = asyncio.get_running_loop().create_task(coro())
        self._tasks[key] = task

        def done(t: asyncio.Task[V]) -> None:
            if self._tasks.get(key) is t:
                del self._tasks[key]
                if on_end is not None:
                    on_end()
            if t.cancelled():
                return
            exc = t.exception()  # retrieved: the waiting callers report it
            if exc is None:
                if on_result is not None:
                    on_result(t.result())
            elif isinstance(exc, AlsdError):
                self._negative.remember(key, exc)

        task.add_done_callback(done)
        return task

    def cancel_all(self) -> list[asyncio.Task[V]]:
        """Cancel every running task; returns them (to be awaited)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        return tasks
