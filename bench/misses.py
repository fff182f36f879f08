# ruff: noqa: RUF001
"""Where alsd's time goes during a cold start, from its debug log.

``bench/run --alsd-setting log_level=debug --keep-logs DIR`` keeps one alsd log per cold
start; ``python -m bench.misses DIR/*.log`` (or one file) prints, per log and as medians
over the logs given:

* the pull phase: every registry exchange alsd made before the first read of a file
  (manifest, config, each layer's tail and TOC), with its start relative to the first
  and its time to the response headers (alsd's ``GET ... -> 206 after N ms`` lines), and
  the resolution times alsd logs per layer (``resolved layer ...``);
* the misses: reads that had to fetch (``miss ...`` lines: FUSE read in the engine ->
  bytes ready), with the fetch batches of demand priority they waited for (``fetch ...``
  lines: queue, fetch slot, network up to the whole body, decode + verify, store write).

Reads that found every chunk in the store, and the kernel's side of a FUSE request (queueing
in /dev/fuse, copying the reply), are not in the log; the FUSE reply follows the engine's
return without an await.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_HTTP = re.compile(
    r"(GET|HEAD) (\S+?)/v2/(\S+)/(manifests|blobs)/(\S+?)(?: \[bytes=([\d,\- ]+)\])? "
    r"-> (\d+) after (\d+) ms"
)
_MISS = re.compile(r"DEBUG miss (\S+) (.*)@(\d+)\+(\d+): (\d+) chunk\(s\), ([\d.]+) ms")
_FETCH = re.compile(
    r"DEBUG fetch (\S+) (\w+): (\d+) range\(s\) (\d+) B (\d+) chunk\(s\): queue ([\d.]+) ms, "
    r"slot ([\d.]+) ms, network ([\d.]+) ms, decode\+verify ([\d.]+) ms, store ([\d.]+) ms"
)
_RESOLVED = re.compile(r"DEBUG resolved layer (\S+?): (.*)$")


def _ts(line: str) -> float | None:
    m = _TS.match(line)
    if not m:
        return None
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class LogSummary:
    path: Path
    exchanges: list[tuple[float, str, float]] = field(default_factory=list)  # (t, what, ms)
    resolved: list[str] = field(default_factory=list)
    misses: list[float] = field(default_factory=list)  # ms
    miss_bytes: int = 0
    fetch: dict[str, list[float]] = field(default_factory=dict)  # phase -> ms per batch
    fetch_bytes: dict[str, int] = field(default_factory=dict)  # priority -> bytes
    first_read: float | None = None
    start: float | None = None


def parse(path: Path) -> LogSummary:
    s = LogSummary(path)
    blobs_seen: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        t = _ts(line)
        if t is None:
            continue
        if (m := _HTTP.search(line)) is not None:
            if s.start is None:
                s.start = t
            kind, name, rng = m[4], m[5], m[6]
            if kind == "manifests":
                what = "manifest"
            elif rng is None:
                what = "config (whole blob)"
            else:
                n = blobs_seen.get(name, 0)
                blobs_seen[name] = n + 1
                what = "tail" if n == 0 else "TOC" if n == 1 else "chunks"
                what += f" {name[7:19]}"
            if s.first_read is None:
                s.exchanges.append((t - s.start, what, float(m[8])))
        elif (m := _MISS.search(line)) is not None:
            if s.first_read is None:
                s.first_read = t
            s.misses.append(float(m[6]))
            s.miss_bytes += int(m[4])
        elif (m := _FETCH.search(line)) is not None:
            prio = m[2]
            s.fetch_bytes[prio] = s.fetch_bytes.get(prio, 0) + int(m[4])
            if prio == "DEMAND":
                for k, v in zip(("queue", "slot", "network", "decode", "store"), m.groups()[5:],
                                strict=True):  # fmt: skip
                    s.fetch.setdefault(k, []).append(float(v))
        elif (m := _RESOLVED.search(line)) is not None:
            s.resolved.append(f"{m[1].rsplit('@', 1)[-1][7:19]}: {m[2]}")
    return s


def _med(xs: Sequence[float]) -> str:
    return f"{statistics.median(xs):.1f}" if xs else "–"


def report(logs: Sequence[LogSummary]) -> str:
    out: list[str] = []
    for s in logs:
        out += [f"## {s.path.name}", ""]
        if s.exchanges:
            out += ["Pull phase (registry exchanges before the first read):", "",
                    "| at | exchange | to headers |", "|---|---|---|"]  # fmt: skip
            out += [f"| {t * 1e3:.0f} ms | {w} | {ms:.0f} ms |" for t, w, ms in s.exchanges]
            out += [""]
        if s.resolved:
            out += ["Layers resolved: " + "; ".join(s.resolved), ""]
        if s.misses:
            fetched = ", ".join(f"{p} {n / 1e6:.1f} MB" for p, n in s.fetch_bytes.items())
            out += [
                f"Misses: {len(s.misses)}, {sum(s.misses) / 1e3:.2f} s in all, median "
                f"{_med(s.misses)} ms, max {max(s.misses):.0f} ms; fetched {fetched}.",
                "",
                "| demand batch phase | median ms | sum s |",
                "|---|---|---|",
            ]
            for k, v in s.fetch.items():
                out.append(f"| {k} | {_med(v)} | {sum(v) / 1e3:.2f} |")
            out += [""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.misses", description=__doc__)
    p.add_argument("logs", nargs="+", type=Path)
    a = p.parse_args(argv)
    paths: list[Path] = []
    for x in a.logs:
        paths += sorted(x.glob("*.log")) if x.is_dir() else [x]
    print(report([parse(x) for x in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
