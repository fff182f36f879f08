# ruff: noqa: RUF001
"""The ``faults`` section: cold starts with a share of alsd's registry requests faulted.

Chain: podman and alsd -> the emulated link (bench/wanproxy.py) -> the fault proxy
(tests/support/faultproxy.py, run here in a thread of its own) -> the registry. The proxy
faults a seeded random ``rate`` of the blob GETs whose User-Agent is alsd's (podman's own
requests pass untouched: the faults are between alsd and the registry), each with one of
:data:`KINDS`: a reset mid-body, a truncated body, a 4 s stall mid-body, a 503, or a
64 KiB/s trickle. Each cold start is checked like the fault-free ones (the container's
output, podman used the store: no fallback to a full pull) and alsd's counters are read
before it stops: integrity errors (a wrong byte would be one: every chunk is verified),
retries, hedges, stalls.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.wanproxy import WanProxy
from bench.workloads import log
from tests.support.faultproxy import FaultProxy

if TYPE_CHECKING:
    from bench import workloads as wl
    from bench.runner import Bench, ColdResult
    from tests.support.daemon import AlsdProcess

KINDS = ("reset", "truncate", "stall", "503", "trickle")
RATES = (0.0, 0.1, 0.3)
VARIANTS = ("alsd-esgz", "alsd-zstd")
STALL_S = 4.0
TRICKLE_BPS = 64 << 10
# alsd's /metrics counters summed per cold start (any registry host).
METRICS = ("retries", "hedges", "stalls", "faults")


class ThreadedFaultProxy:
    """A :class:`FaultProxy` on an event loop of its own, for the synchronous runner."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._proxy: FaultProxy | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._proxy is not None
        return self._proxy.port

    def start(self) -> ThreadedFaultProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._proxy = loop.run_until_complete(FaultProxy(self.upstream).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._proxy.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def _call(self, fn: Any) -> Any:
        assert self._loop is not None

        async def wrapped() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(30)

    def configure(self, rate: float, seed: int) -> None:
        """Fault ``rate`` of alsd's blob GETs from now on (0: none); counters zeroed."""

        def apply() -> None:
            assert self._proxy is not None
            self._proxy._rules.clear()
            self._proxy.requests.clear()
            self._proxy.injected.clear()
            if rate > 0:
                self._proxy.random_faults(
                    rate, KINDS, seed=seed, user_agent="alsd", stall_s=STALL_S,
                    trickle_bps=TRICKLE_BPS,
                )  # fmt: skip

        self._call(apply)

    def injected(self) -> Counter[str]:
        return Counter(self._call(lambda: dict(self._proxy.injected if self._proxy else {})))

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)


@dataclass
class FaultRun:
    """One (variant, rate): the cold starts and what was injected and counted."""

    result: ColdResult
    injected: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)
    integrity_errors: int = 0


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``alsd_registry_<name>_total`` in a /metrics text."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"alsd_registry_{name}_total(?:{{[^}}]*}})? ([0-9.e+]+)$", line)
        if m:
            total += float(m.group(1))
    return total


def run_faults(b: Bench, w: wl.Workload, expect: str) -> dict[tuple[str, float], FaultRun]:
    from bench.runner import VARIANTS as ALL_VARIANTS
    from bench.runner import ColdResult

    assert b.registry is not None
    variants = [v for v in ALL_VARIANTS if v.key in VARIANTS]
    fp = ThreadedFaultProxy(f"http://{b.registry.address}").start()
    link = WanProxy(("127.0.0.1", fp.port), rate_mbit=b.args.rate_mbit, rtt_ms=b.args.rtt_ms)
    link.start()
    saved = b.proxy
    b.proxy = link  # refs and byte counts of cold_start now go through the faulty chain
    runs: dict[tuple[str, float], FaultRun] = {}
    try:
        for rep in range(b.args.fault_reps):
            for rate in RATES:
                for v in variants:
                    run = runs.setdefault((v.key, rate), FaultRun(ColdResult()))
                    seed = 1000 * rep + int(rate * 100)
                    fp.configure(rate, seed)
                    log(f"faults {w.name} / {v.key} at {rate:.0%} ({rep + 1}/{b.args.fault_reps})")

                    def inspect(als: AlsdProcess, run: FaultRun = run) -> None:
                        text = als.metrics()
                        for name in METRICS:
                            run.counters[name] += int(metric_sum(text, name))
                        m = re.search(r"^alsd_fetch_integrity_errors ([0-9]+)", text, re.M)
                        if m is None:  # never report "0 wrong bytes" unread
                            raise RuntimeError("no alsd_fetch_integrity_errors in /metrics")
                        run.integrity_errors += int(m.group(1))

                    b.cold_start(w, v, run.result, expect, inspect=inspect)
                    run.injected.update(fp.injected())
    finally:
        b.proxy = saved
        link.stop()
        fp.stop()
    return runs


def report(b: Bench, runs: dict[tuple[str, float], FaultRun]) -> list[str]:
    """The section's Markdown: a table per variant, ratios to the fault-free run."""
    from bench.runner import VARIANTS as ALL_VARIANTS

    out = [
        "### Faults between alsd and the registry",
        "",
        f"Cold start of the python workload through podman with a share of alsd's blob "
        f"requests faulted by the fault proxy (kinds drawn evenly from {', '.join(KINDS)}; "
        f"stalls of {STALL_S:g} s mid-body, trickles at {TRICKLE_BPS >> 10} KiB/s), seeded, "
        f"{b.args.fault_reps} repetition(s) per rate: median (min–max). Bytes = registry → "
        "client bytes over the link. Retries, hedges, stalls and faults: alsd's per-registry "
        "counters (/metrics), summed over the repetitions. Injected faults and alsd's "
        "counters cover each cold start and the warm start after it (same alsd, same fault "
        "rate); the times are the cold start's.",
        "",
    ]
    targets = {0.1: 2.0, 0.3: 4.0}
    lines_t: list[str] = []
    for v in [v for v in ALL_VARIANTS if v.key in VARIANTS]:
        base = runs.get((v.key, 0.0))
        out += [
            f"#### {v.label}",
            "",
            "| faulted | cold start | vs 0 % | bytes over link | vs 0 % | injected | retries | "
            "hedges | stalls | faults | integrity errors | failures |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rate in RATES:
            r = runs.get((v.key, rate))
            if r is None:
                continue
            res = r.result
            t = res.total.fmt() if res.total.ok else "–"
            by = res.bytes_total.fmt("MB", 1e6, 1) if res.bytes_total.ok else "–"
            rt = rb = "–"
            if base is not None and base.result.total.ok and res.total.ok:
                rt = f"{res.total.median / base.result.total.median:.2f}×"
                rb = f"{res.bytes_total.median / base.result.bytes_total.median:.2f}×"
                if rate in targets:
                    ratio = res.total.median / base.result.total.median
                    ok = ratio <= targets[rate] and not res.pull.errors and not r.integrity_errors
                    lines_t.append(
                        f"- {v.label}, {rate:.0%} faulted: cold start {ratio:.2f}× the fault-free "
                        f"one (target ≤ {targets[rate]:g}×), {r.integrity_errors} integrity "
                        f"errors, {len(res.pull.errors)} failed starts — "
                        f"{'met' if ok else 'not met'}"
                    )
            inj = ", ".join(f"{k} {n}" for k, n in sorted(r.injected.items())) or "0"
            c = r.counters
            out.append(
                f"| {rate:.0%} | **{t}** | {rt} | {by} | {rb} | {inj} | {c['retries']} | "
                f"{c['hedges']} | {c['stalls']} | {c['faults']} | {r.integrity_errors} | "
                f"{len(res.pull.errors)} |"
            )
        out.append("")
    if lines_t:
        out += ["Targets (issue 18):", "", *lines_t, ""]
    return out
