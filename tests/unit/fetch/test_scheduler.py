"""Scheduler: strict priority order of request slots and the quiet gate of background work.

No durations are asserted: tests observe the order in which things happen.
"""

from __future__ import annotations

import asyncio

import pytest

from alsd.fetch.scheduler import Priority, Scheduler


async def _settle() -> None:
    # Let every ready task run until it blocks.
    for _ in range(10):
        await asyncio.sleep(0)


async def test_freed_slots_go_to_the_best_priority_first() -> None:
    s = Scheduler(1)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with s.slot(Priority.DEMAND):
            await release.wait()

    async def worker(name: str, prio: Priority) -> None:
        async with s.slot(prio):
            order.append(name)

    h = asyncio.create_task(holder())
    await _settle()
    tasks = [
        asyncio.create_task(worker("bg1", Priority.BACKGROUND)),
        asyncio.create_task(worker("pf1", Priority.PREFETCH)),
        asyncio.create_task(worker("bg2", Priority.BACKGROUND)),
        asyncio.create_task(worker("d1", Priority.DEMAND)),
        asyncio.create_task(worker("pf2", Priority.PREFETCH)),
        asyncio.create_task(worker("d2", Priority.DEMAND)),
    ]
    await _settle()
    assert order == []
    assert s.waiting() == {"demand": 2, "prefetch": 2, "background": 2}
    release.set()
    await asyncio.gather(h, *tasks)
    assert order == ["d1", "d2", "pf1", "pf2", "bg1", "bg2"]
    assert s.free_slots == 1


async def test_a_newcomer_does_not_overtake_a_better_waiter() -> None:
    s = Scheduler(1)
    got: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with s.slot(Priority.BACKGROUND):
            await release.wait()

    async def worker(name: str, prio: Priority) -> None:
        async with s.slot(prio):
            got.append(name)

    h = asyncio.create_task(holder())
    await _settle()
    d = asyncio.create_task(worker("demand", Priority.DEMAND))
    await _settle()
    release.set()
    # Submitted after the slot was handed over: must come second.
    b = asyncio.create_task(worker("background", Priority.BACKGROUND))
    await asyncio.gather(h, d, b)
    assert got == ["demand", "background"]


async def test_cancelled_waiter_does_not_leak_its_slot() -> None:
    s = Scheduler(1)
    release = asyncio.Event()

    async def holder() -> None:
        async with s.slot(Priority.DEMAND):
            await release.wait()

    async def waiter() -> None:
        async with s.slot(Priority.BACKGROUND):
            pass

    h = asyncio.create_task(holder())
    await _settle()
    w = asyncio.create_task(waiter())
    await _settle()
    w.cancel()
    release.set()
    await h
    with pytest.raises(asyncio.CancelledError):
        await w
    assert s.free_slots == 1
    async with s.slot(Priority.BACKGROUND):
        assert s.free_slots == 0


async def test_background_waits_while_reads_and_prefetch_run() -> None:
    s = Scheduler(2, quiet_period_s=0.0)
    events: list[str] = []

    async def background() -> None:
        await s.wait_quiet()
        events.append("background")

    with s.demand():
        t = asyncio.create_task(background())
        await _settle()
        assert events == []
        with s.prefetching():
            pass  # still a read running
        await _settle()
        assert events == []
        events.append("read done")
    await asyncio.wait_for(t, 10)
    assert events == ["read done", "background"]

    events.clear()
    with s.prefetching():
        t = asyncio.create_task(background())
        await _settle()
        assert events == []
        events.append("prefetch done")
    await asyncio.wait_for(t, 10)
    assert events == ["prefetch done", "background"]


async def test_background_resumes_only_after_the_quiet_period() -> None:
    loop = asyncio.get_running_loop()
    s = Scheduler(1, quiet_period_s=0.2)
    with s.demand():
        pass
    ended = loop.time()
    await s.wait_quiet()
    # Ordering on the loop clock, not a duration assertion on wall time.
    assert loop.time() >= ended + 0.2
