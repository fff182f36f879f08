# ruff: noqa: RUF001, RUF002
"""Turn a finished :class:`bench.runner.Bench` into ``results/<date>.md`` and a PNG chart.

Every figure is a median with its min–max over the repetitions; ratios are of medians.
The latest table is also copied into ``bench/README.md`` between two marker comments.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.runner import Bench, ColdResult, Stat

README_BEGIN = "<!-- latest results: begin -->"
README_END = "<!-- latest results: end -->"
FAULTS_BEGIN = "<!-- faults results: begin -->"
FAULTS_END = "<!-- faults results: end -->"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "–"
    return f"{a / b:.2f}×"


def _machine() -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1e6:.1f} GB"
    except (OSError, ValueError, IndexError):
        pass
    deb = "?"
    with contextlib.suppress(OSError):
        deb = Path("/etc/debian_version").read_text().strip()

    return [
        f"CPU: {cpu}, {os.cpu_count()} cores; RAM {mem}",
        f"Kernel {platform.release()}, Debian {deb}, Python {platform.python_version()}",
    ]


def _git_rev(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "alsd"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return r.stdout.strip() + (" (alsd/ modified)" if dirty else "")


def _cold_table(b: Bench, label: str) -> list[str]:
    from bench.runner import VARIANTS

    base = b.cold.get((label, "gzip"))
    lines = [
        "| variant | pull | run | cold start | vs gzip | warm start | bytes over link "
        "| vs gzip | alsd RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        r: ColdResult | None = b.cold.get((label, v.key))
        if r is None:
            continue
        if not r.total.ok:
            reason = "; ".join(dict.fromkeys(r.pull.errors))[:300] or "not run"
            lines.append(f"| {v.label} | failed: {reason} | | | | | | | |")
            continue
        t_ratio = _ratio(r.total.median, base.total.median) if base and base.total.ok else "–"
        b_ratio = (_ratio(r.bytes_total.median, base.bytes_total.median)
                   if base and base.bytes_total.ok else "–")  # fmt: skip
        rss = r.rss.fmt("MB", 1e6, 0) if r.rss.ok else "–"
        row = v.label
        if r.pull.errors:
            n = len(r.pull.errors)
            row += f" ({n} of {n + len(r.total.values)} runs failed, see Failures)"
        lines.append(
            f"| {row} | {r.pull.fmt()} | {r.run.fmt()} | **{r.total.fmt()}** | {t_ratio} "
            f"| {r.warm.fmt()} | {r.bytes_total.fmt('MB', 1e6, 1)} | {b_ratio} | {rss} |"
        )
    return lines


def _profiles_table(b: Bench, label: str, name: str) -> list[str]:
    """Issue 15: each image without and with a pushed prefetch profile, against the
    prioritised eStargz (target: with profile <= 1.15x); and alsd with profiles on vs off
    on an image without one (target: no slower)."""
    from bench.runner import IMAGES, VARIANTS

    prio = b.cold.get((label, "alsd-esgz-prio"))
    rows = []
    for v in VARIANTS:
        if not v.profile:
            continue
        without = next((b.cold.get((label, x.key)) for x in VARIANTS
                        if x.image == v.image and x.store == "alsd" and not x.profile
                        and not x.settings), None)  # fmt: skip
        with_ = b.cold.get((label, v.key))
        if with_ is None:
            continue
        ok = with_.total.ok
        vs_prio = (_ratio(with_.total.median, prio.total.median)
                   if ok and prio is not None and prio.total.ok else "–")  # fmt: skip
        gain = (_ratio(with_.total.median, without.total.median)
                if ok and without is not None and without.total.ok else "–")  # fmt: skip
        facts = b.images.get(name, {}).get("profiles", {})
        gen = next((g for lab, n, g in b.cold_runs if lab == label), "host")
        pf = facts.get(f"{v.image}/{gen}", {})
        rows.append(
            f"| {IMAGES[v.image].label} | {without.total.fmt() if without else 'n/a'} "
            f"| {with_.total.fmt() if ok else 'failed'} | {gain} | **{vs_prio}** "
            f"| {without.bytes_total.fmt('MB', 1e6, 1) if without else 'n/a'} "
            f"| {with_.bytes_total.fmt('MB', 1e6, 1) if ok else '–'} "
            f"| {pf.get('entries', '–')} files, {_mb(pf['compressed_bytes']) if pf else '–'} |"
        )
    if not rows:
        return []
    out = [
        "| image | cold start without profile | with pushed profile | with / without "
        "| with / prioritised eStargz (target ≤ 1.15×) | bytes without | bytes with "
        "| profile (files, compressed bytes they cover) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if prio is not None and prio.total.ok:
        out += ["", f"Prioritised eStargz (alsd convert, traced files): {prio.total.fmt()}."]
    on, off = b.cold.get((label, "alsd-esgz")), b.cold.get((label, "alsd-esgz-noprofiles"))
    if on is not None and off is not None and on.total.ok and off.total.ok:
        out += [
            "",
            f"First run, no profile anywhere (eStargz): profiles on {on.total.fmt()} vs off "
            f"{off.total.fmt()}: {_ratio(on.total.median, off.total.median)} (target: no "
            "slower; on = a referrers lookup concurrent with the TOC fetches, and recording).",
        ]
    return out


def _compare_table(b: Bench, label: str, name: str) -> list[str]:
    """alsd and stargz-store side by side per image (ratios of medians), or nothing."""
    from bench.runner import IMAGES, VARIANTS

    rows = []
    read_set = b.images.get(name, {}).get("read_set", {})
    for k, im in IMAGES.items():
        a = next((b.cold.get((label, v.key)) for v in VARIANTS
                  if v.image == k and v.store == "alsd"), None)  # fmt: skip
        s = b.cold.get((label, f"sgz-{k}"))
        if s is None:
            continue
        ok_a = a is not None and a.total.ok
        ok_s = s.total.ok
        t = _ratio(a.total.median, s.total.median) if a and ok_a and ok_s else "–"
        by = _ratio(a.bytes_total.median, s.bytes_total.median) if a and ok_a and ok_s else "–"
        rs = read_set.get(k)
        rows.append(
            f"| {im.label} | {a.total.fmt() if a else 'n/a'} | {s.total.fmt()} | **{t}** "
            f"| {a.bytes_total.fmt('MB', 1e6, 1) if a else 'n/a'} "
            f"| {s.bytes_total.fmt('MB', 1e6, 1)} | **{by}** "
            f"| {_mb(rs) if rs else '–'} "
            f"| {_ratio(a.bytes_total.median, rs) if a and ok_a and rs else '–'} "
            f"| {_ratio(s.bytes_total.median, rs) if ok_s and rs else '–'} |"
        )
    if not rows:
        return []
    return [
        "| image | alsd cold start | stargz-store cold start | alsd / stargz-store "
        "| alsd bytes | stargz-store bytes | alsd / stargz-store | read set "
        "| alsd / read set | stargz-store / read set |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _targets13(b: Bench) -> list[str]:
    """Issue 13's targets: alsd vs stargz-store per image, prioritised vs gzip, bytes vs
    the read set."""
    from bench.runner import IMAGES, VARIANTS

    out = []
    for label, name, _ in b.cold_runs:
        base = b.cold.get((label, "gzip"))
        read_set = b.images.get(name, {}).get("read_set", {})
        for v in VARIANTS:
            if v.store != "alsd":
                continue
            a = b.cold.get((label, v.key))
            if a is None or not a.total.ok:
                continue
            im = IMAGES[v.image]
            s = b.cold.get((label, f"sgz-{v.image}"))
            if s is not None and s.total.ok:
                rt = a.total.median / s.total.median
                rb = a.bytes_total.median / s.bytes_total.median
                ok = rt <= 0.8 and rb <= 1.0
                out.append(f"- {label}, {im.label}: alsd / stargz-store time {rt:.2f}× "
                           f"(≤ 0.8×), bytes {rb:.2f}× (≤ 1.0×) — "
                           f"{'met' if ok else 'NOT met'}")  # fmt: skip
            if im.prioritised and base is not None and base.total.ok:
                r = a.total.median / base.total.median
                out.append(f"- {label}, {im.label}: alsd vs full gzip pull {r:.2f}× "
                           f"(≤ 0.10×) — {'met' if r <= 0.10 else 'NOT met'}")  # fmt: skip
            rs = read_set.get(v.image)
            if rs:
                r = a.bytes_total.median / rs
                out.append(f"- {label}, {im.label}: alsd bytes {_mb(a.bytes_total.median)} vs "
                           f"read set {_mb(rs)}: {r:.2f}× (≤ 1.3×) — "
                           f"{'met' if r <= 1.3 else 'NOT met'}")  # fmt: skip
    return out


def _targets(b: Bench) -> list[str]:
    out = []
    for w, name, _ in b.cold_runs:
        facts = b.images.get(name, {})
        base = b.cold.get((w, "gzip"))
        prio = b.cold.get((w, "alsd-esgz-prio"))
        if base and prio and base.total.ok and prio.total.ok:
            r = prio.total.median / base.total.median
            out.append(f"- {w}: cold start, alsd + prioritised eStargz vs full gzip pull: "
                       f"{r:.2f}× (target ≤ 0.15×) — "
                       f"{'met' if r <= 0.15 else 'NOT met'}")  # fmt: skip
            pc = facts.get("prio_compressed_bytes") or 0
            if pc:
                rb = prio.bytes_total.median / pc
                out.append(
                    f"- {w}: bytes fetched for that start {_mb(prio.bytes_total.median)} vs "
                    f"compressed size of the prioritised (traced) files {_mb(pc)}: {rb:.2f}× "
                    f"(target ≤ 1.5×) — {'met' if rb <= 1.5 else 'NOT met'}"
                )
    rd = b.sections.get("read")
    if rd and rd["chunkstore"].ok and rd["local_disk"].ok:
        r1 = rd["chunkstore"].median / rd["local_disk"].median
        r2 = rd["pagecache"].median / rd["local_pagecache"].median
        out.append(f"- warm reads from the chunk store vs local disk: {r1:.2f}× "
                   f"(target ≥ 0.5×) — {'met' if r1 >= 0.5 else 'NOT met'}")  # fmt: skip
        out.append(f"- page-cache reads vs local page cache: {r2:.2f}× (target ≥ 0.9×) — "
                   f"{'met' if r2 >= 0.9 else 'NOT met'}")  # fmt: skip
    md = b.sections.get("metadata")
    if md and md["second"].ok:
        r = md["second"].median / md["local_second"].median
        out.append(f"- second metadata pass vs local: {r:.2f}× (target ≤ 1.5×) — "
                   f"{'met' if r <= 1.5 else 'NOT met'}")  # fmt: skip
    rs = b.sections.get("restart")
    if rs and rs["first_lookup"].ok:
        t = rs["first_lookup"].median
        by = max(rs["bytes"].values)  # every restart must fetch nothing, not just the median
        out.append(f"- restart to serving: {t:.2f} s (median), up to {by:.0f} bytes fetched "
                   f"(target < 1 s, 0 bytes) — "
                   f"{'met' if t < 1 and by == 0 else 'NOT met'}")  # fmt: skip
    return out


def _chart(b: Bench, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from bench.runner import VARIANTS

    workloads = [label for label, _, _ in b.cold_runs]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5),
                             squeeze=False)  # fmt: skip
    for ax, w in zip(axes[0], workloads, strict=True):
        labels, pulls, runs = [], [], []
        for v in VARIANTS:
            r = b.cold.get((w, v.key))
            if r is None:
                continue
            labels.append(v.label.replace(", ", ",\n"))
            pulls.append(r.pull.median if r.total.ok else 0.0)
            runs.append(r.run.median if r.total.ok else 0.0)
        x = range(len(labels))
        ax.bar(x, pulls, label="podman pull", color="#4c72b0")
        ax.bar(x, runs, bottom=pulls, label="podman run (to exit)", color="#dd8452")
        for i, (tp, tr) in enumerate(zip(pulls, runs, strict=True)):
            ax.text(i, tp + tr, f"{tp + tr:.1f}s" if tp + tr else "failed", ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"cold start: {w}")
        ax.legend(fontsize=8)
    a = b.args
    fig.suptitle(f"{a.rate_mbit:g} Mbit/s, {a.rtt_ms:g} ms RTT emulated link", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(b: Bench, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    md_path = out_dir / f"{stamp}.md"
    png_path = out_dir / f"{stamp}-cold-start.png"
    a = b.args
    L: list[str] = [f"# alsd benchmark, {time.strftime('%Y-%m-%d %H:%M')}", ""]
    L += [f"- {x}" for x in _machine()]
    L += [
        f"- {'; '.join(b.podman_versions.values())}; "
        f"alsd at git {_git_rev(Path(__file__).resolve().parents[1])}",
        f"- Link: userspace proxy (bench/wanproxy.py) in front of a loopback docker-registry, "
        f"{a.rate_mbit:g} Mbit/s token bucket per direction, {a.rtt_ms:g} ms added RTT "
        f"(+1 RTT per new connection)",
        "- alsd settings: defaults"
        + "".join(f", {k} = {v}" for k, v in getattr(a, "alsd_settings", {}).items()),
        f"- {a.reps} repetition(s) per figure: median (min–max). Run took "
        f"{getattr(b, 'duration', 0) / 60:.1f} min. Cold = image absent, fresh podman store, "
        "fresh alsd state, page cache dropped.",
        "",
        "## Workloads",
        "",
        "| workload | files | tar | gzip | zstd:chunked | eStargz | eStargz prio. "
        "| prioritised files (runtime + read by CMD) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, f in b.images.items():
        zstd = _mb(f["zstdchunked_size"]) if "zstdchunked_size" in f else "failed"
        if "zstdchunked_other_size" in f:
            zstd += f" ({_mb(f['zstdchunked_other_size'])} by {b.podman_versions['other']})"
        L.append(
            f"| {w} | {f.get('files', '?')} | {_mb(f.get('tar_size', 0))} | "
            f"{_mb(f.get('gzip_size', 0))} | {zstd} | "
            f"{_mb(f.get('esgz_size', 0))} | {_mb(f.get('esgz_prio_size', 0))} | "
            f"{f.get('traced_files', 0)} files, {_mb(f.get('traced_bytes', 0))} "
            f"({_mb(f.get('prio_compressed_bytes', 0))} compressed) |"
        )
    ctr = [(w, f) for w, f in b.images.items() if "ctr_remote" in f]
    if ctr:
        L += ["", f"Converted by ctr-remote (Debian stargz-snapshotter "
              f"{ctr[0][1]['ctr_remote']}) from the gzip image:", "",
              "| workload | eStargz | eStargz prio. (--estargz-record-in) | zstd:chunked |",
              "|---|---|---|---|"]  # fmt: skip
        for w, f in ctr:
            L.append("| " + " | ".join([w] + [
                _mb(f[k + "_size"]) if k + "_size" in f else "–"
                for k in ("ctr-esgz", "ctr-esgz-prio", "ctr-zstd")]) + " |")  # fmt: skip
    L += [""]
    for w, f in b.images.items():
        L += [f"- **{w}**: {f['description']}. CMD: `{f['cmd']}`"]
    L += ["", "## Cold and warm start", "",
          "pull = `podman pull`, run = `podman run --rm` to container exit, cold start = both; "
          "warm start = `podman run --rm` again with the image present; bytes = registry → "
          "client bytes across the link during pull + run.", ""]  # fmt: skip
    for label, _, _ in b.cold_runs:
        L += [f"### {label}", "", *_cold_table(b, label), ""]
    prof = [(label, _profiles_table(b, label, name)) for label, name, _ in b.cold_runs]
    if any(t for _, t in prof):
        L += [
            "## Prefetch profiles", "",
            "Each image is copied to a repository of its own, run once through alsd (which "
            "records the files the container reads), and the profile pushed next to it with "
            "`alsd profile push` (the referrers tag schema: docker-registry 2.8 has no "
            "referrers API). The cold start with profile then runs on fresh alsd state and a "
            "fresh podman store, as a second host would: alsd finds the profile while it "
            "fetches the TOCs and prefetches its files in order.", "",
        ]  # fmt: skip
        for label, t in prof:
            if t:
                L += [f"### {label}", "", *t, ""]
    side = [(label, _compare_table(b, label, name)) for label, name, _ in b.cold_runs]
    if any(t for _, t in side):
        L += [
            "## alsd and stargz-store side by side", "",
            "Same images, link and repetitions, interleaved; ratios are of medians (below 1: "
            "alsd faster or fewer bytes). Bytes: registry → client across the link during "
            "pull + run, counted at the link for both. Read set: the compressed ranges of the "
            "chunks of the files the command and the runtime read (the traced list), each "
            "once, plus the TOC: what a store has to fetch at least.", "",
        ]  # fmt: skip
        for label, t in side:
            if t:
                L += [f"### {label}", "", *t, ""]
    if _chart(b, png_path):
        L += [f"![cold start per variant]({png_path.name})", ""]
    rd = b.sections.get("read")
    if rd:
        S: dict[str, Stat] = rd
        L += [
            "## Read throughput through diff/", "",
            f"One {_mb(rd['size'])} incompressible file in an eStargz layer "
            f"({_mb(rd['blob_size'])} blob), read sequentially with 1 MiB reads.", "",
            "| read | throughput | vs local |", "|---|---|---|",
            f"| cold, from the registry over the link | {S['cold'].fmt('MB/s', 1e6, 1)} | "
            f"{_ratio(S['cold'].median, S['local_disk'].median)} (of local disk); "
            f"{_ratio(S['cold'].median, a.rate_mbit * 1e6 / 8)} of the link rate |",
            f"| again, from the chunk store (page cache dropped) | "
            f"{S['chunkstore'].fmt('MB/s', 1e6, 1)} | "
            f"{_ratio(S['chunkstore'].median, S['local_disk'].median)} (of local disk) |",
            f"| again, from the chunk store, its files in the page cache (only the mount's "
            f"pages dropped) | {S['chunkstore_cached'].fmt('MB/s', 1e6, 1)} | "
            f"{_ratio(S['chunkstore_cached'].median, S['local_disk'].median)} (of local disk) |",
            f"| again, page cache | {S['pagecache'].fmt('MB/s', 1e6, 1)} | "
            f"{_ratio(S['pagecache'].median, S['local_pagecache'].median)} (of local page cache) |",
            f"| local directory, page cache dropped | {S['local_disk'].fmt('MB/s', 1e6, 1)} | |",
            f"| local directory, page cache | {S['local_pagecache'].fmt('MB/s', 1e6, 1)} | |",
            "",
            f"Bytes over the link for the cold read: {rd['bytes_cold'].fmt('MB', 1e6, 1)}.",
            "",
            f"Page cache dropped: {rd.get('disk_reads', 1)} reads per repetition, the chunk "
            "store's and the local copy's in turn. Page cache: each figure is the median of "
            f"{rd.get('pagecache_reads', 5)} back-to-back reads. Share of the file's cached "
            "pages held in large folios (bench/pagecache.py, from /proc/kpageflags): "
            f"alsd {_share(rd.get('large_folios'))}, local {_share(rd.get('local_large_folios'))}.",
            "",
        ]  # fmt: skip
    md = b.sections.get("metadata")
    if md:
        L += [
            "## Metadata", "",
            f"`find DIR -printf '%s %T@ %m'` (an lstat per entry) over the {md['workload']} "
            f"eStargz layer's diff/ ({md['entries']} entries) vs the same tree on local disk "
            f"({md['local_entries']} entries). First pass after dropping the page cache; the "
            f"layer was looked up (TOC fetched) before: lookup {md['lookup'].fmt()}.", "",
            "| pass | alsd | local | vs local |", "|---|---|---|---|",
            f"| first | {md['first'].fmt(digits=3)} | {md['local_first'].fmt(digits=3)} | "
            f"{_ratio(md['first'].median, md['local_first'].median)} |",
            f"| second | {md['second'].fmt(digits=3)} | {md['local_second'].fmt(digits=3)} | "
            f"{_ratio(md['second'].median, md['local_second'].median)} |",
            "",
        ]  # fmt: skip
        reqs = md.get("second_requests")
        if reqs:
            L += [
                f"FUSE requests alsd answered during the second pass (last repetition): "
                f"{sum(reqs.values())} — "
                + ", ".join(f"{op} {n}" for op, n in sorted(reqs.items(), key=lambda x: -x[1])),
                "",
            ]
    rs = b.sections.get("restart")
    if rs:
        per = "–"
        if rs["rss_loaded"].ok and rs["rss_idle"].ok:
            per = _mb((rs["rss_loaded"].median - rs["rss_idle"].median)
                      * 100_000 / rs["toc_entries"])  # fmt: skip
        L += [
            "## Restart and memory", "",
            f"{rs['layers']} eStargz layers ({rs['toc_entries']} TOC entries in all) looked up "
            "and listed, alsd stopped (SIGTERM) and started again on the same state directory. "
            "Background fetch off for this section (unless overridden): with it on, a background "
            "fetch left unfinished by the first run resumes at start-up and its bytes would "
            "count here.",
            "",
            "| figure | value |", "|---|---|",
            f"| process start → mounted | {rs['mount'].fmt(digits=3)} |",
            f"| process start → first known layer's diff/ answers | "
            f"{rs['first_lookup'].fmt(digits=3)} |",
            f"| process start → all {rs['layers']} answered | {rs['all_lookups'].fmt(digits=3)} |",
            f"| bytes fetched from the registry meanwhile | {rs['bytes'].fmt('B', 1, 0)} |",
            f"| connections to the registry meanwhile | {rs['connections'].fmt('', 1, 0)} |",
            f"| alsd RSS, idle after start | {rs['rss_idle'].fmt('MB', 1e6, 1)} |",
            f"| alsd RSS, {rs['layers']} layers loaded | {rs['rss_loaded'].fmt('MB', 1e6, 1)} |",
            f"| alsd RSS after restart, layers listed | {rs['rss_restarted'].fmt('MB', 1e6, 1)} |",
            f"| RSS growth per 100 000 TOC entries (loaded − idle) | {per} |",
            "",
            "`python -m bench.index_memory 100000` (a parsed LayerIndex alone):", "",
            "```", str(rs.get("index_memory", "")).strip(), "```", "",
        ]  # fmt: skip
    mat = b.sections.get("materialized")
    if mat:
        from bench.materialized import report as materialized_report

        L += materialized_report(mat)
    L += [
        "## Notes",
        "",
        "- Each podman generation pulls the zstd:chunked image it pushed itself (podman 5.4 "
        "cannot pull the 2020 layout podman 4.3 writes: its DiffID check fails).",
        "- podman's partial pull of zstd:chunked works on this podman (its debug log says "
        '"Retrieved partial blob"), but it fetches every chunk that local storage does not '
        "already hold: into an empty store that is the whole layer. It saves bytes only when "
        "other images already share files, which a cold start does not have.",
        "- podman's partial pull can move more bytes over the link than the zstd:chunked "
        "blob's size (compare its bytes over the link with the Workloads table; podman 4.3.1 "
        "did, 5.4.2 did not, when both ran here; not investigated: it asks for chunks with "
        "multi-range requests, whose multipart framing is one candidate).",
        "- alsd runs with its defaults, including the background fetch of whole layers after "
        "the on-demand reads and the read-ahead after a read that misses (the next 512 KiB "
        "of the layer, `[fetch] readahead_bytes`); bytes are counted until the container "
        "exits, so the alsd figures include what the background fetch and the read-ahead "
        "got meanwhile.",
        "- Chunk store with the page cache dropped: the 100 MB file is 25 chunk files of 4 MiB, "
        "each read cold with a read-ahead of its own, where the local copy is one file; the "
        "row with the chunk files in the page cache is what serving through FUSE costs alsd "
        "without the disk.",
        "- Page cache: on this kernel FUSE caches file data in 4 KiB pages (no large "
        "folios; the share above is measured), while ext4 caches the local copy mostly in "
        "large folios, so a read from the page cache copies page by page through alsd's mount "
        "and folio by folio from the local disk. No request reaches alsd during these reads; "
        "the gap is in the kernel (read-ahead of 128 KiB and 4 MiB both give 4 KiB pages): "
        "this kernel's FUSE does not allow large folios in a file's mapping (a patch that "
        "would, 'fuse: enable large folios', was posted to linux-fsdevel in 2024).",
        "- Metadata, second pass: every pass still sends opendir, readdirplus (twice: entries, "
        "then the end) and releasedir per directory; lookups and attributes come from the "
        "kernel's cache (1 h timeouts). The kernel keeps directory listings itself only when "
        "the opendir reply carries FOPEN_CACHE_DIR, or when opendir answers ENOSYS and "
        "readdir is then told the directory's inode. pyfuse3 3.5 (the binding alsd is built "
        "on) exposes neither: its opendir returns only a handle and its readdir gets only "
        "that handle. With either, the second pass would cost no request at all.",
        "- The traced file list comes from `strace -f -e trace=open,openat,execve` of the "
        "image's CMD in a chroot of its rootfs (successful opens, plus symlinks on the way and "
        "the ELF interpreter), with etc/passwd and etc/group first, as `alsd convert "
        "--prioritize` does: podman reads them while it creates the container.",
        "",
    ]
    if b.cold:
        L += ["## Targets (issue 7)", ""] + (_targets(b) or ["- no figures to compare"]) + [""]
        t13 = _targets13(b)
        if t13:
            L += ["## Targets (issue 13)", "", *t13, ""]
    if b.faults:
        from bench.faults import report as faults_report

        faults = faults_report(b, b.faults)
        L += ["#" + x if x.startswith("### ") else x for x in faults]
        head = [f"# alsd under registry faults, {time.strftime('%Y-%m-%d %H:%M')}", ""]
        head += [f"- {x}" for x in _machine()]
        head += [
            f"- {b.podman_version}; alsd at git {_git_rev(Path(__file__).resolve().parents[1])}",
            f"- Link: bench/wanproxy.py, {a.rate_mbit:g} Mbit/s, {a.rtt_ms:g} ms RTT; the fault "
            "proxy (tests/support/faultproxy.py) between the link and the registry",
            "",
        ]
        faults_md = out_dir / f"{stamp}-faults.md"
        faults_md.write_text("\n".join(head + faults))
        _update_block(
            out_dir.parent / "README.md", FAULTS_BEGIN, FAULTS_END,
            f"From [results/{faults_md.name}](results/{faults_md.name}).\n\n"
            + "\n".join(faults),
        )  # fmt: skip
    if b.failures:
        L += ["## Failures", ""] + [f"- {f}" for f in b.failures] + [""]
    text = "\n".join(L)
    md_path.write_text(text)
    write_raw(b, md_path.with_suffix(".json"))
    if b.cold:  # a run of the faults section alone leaves the headline figures alone
        _update_readme(out_dir.parent / "README.md", text, md_path.name)
    return md_path


def _update_block(readme: Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of the README."""
    if not readme.exists():
        return
    body = readme.read_text()
    if begin not in body or end not in body:
        return
    head, _, rest = body.partition(begin)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{begin}\n\n{text.strip()}\n\n{end}{tail}")


def _update_readme(readme: Path, text: str, name: str) -> None:
    if not readme.exists():
        return
    body = readme.read_text()
    if README_BEGIN not in body or README_END not in body:
        return
    head, _, rest = body.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    # The headline only: machine and link, the cold/warm start tables, the chart and the
    # targets; headings one level down so they nest under "Latest results".
    keep = ("## Cold and warm start", "## alsd and stargz-store", "## Targets")
    parts = text.split("\n## ")
    picked = [parts[0].split("\n", 1)[1]] + [
        "## " + p for p in parts[1:] if any(("## " + p).startswith(k) for k in keep)
    ]
    block = "\n".join(picked)
    block = "\n".join("#" + x if x.startswith("#") else x for x in block.splitlines())
    block = block.replace("](", "](results/").replace("](results/http", "](http")
    readme.write_text(
        f"{head}{README_BEGIN}\n\nFrom [results/{name}](results/{name}), which also has "
        f"read throughput, metadata, restart and memory figures.\n{block}\n{README_END}{tail}"
    )


def _share(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.0%}"


def write_raw(b: Bench, path: Path) -> None:
    """Every sample as JSON, so that a report can be redone or compared later."""
    import dataclasses
    import json

    def conv(o: object) -> object:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return {k: conv(v) for k, v in dataclasses.asdict(o).items()}
        if isinstance(o, dict):
            return {str(k): conv(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [conv(v) for v in o]
        return o

    doc = {
        # Not "out": where the report went says nothing about the figures.
        "args": {k: str(v) for k, v in vars(b.args).items() if k != "out"},
        "podman": b.podman_version,
        "podman_versions": b.podman_versions,
        "images": b.images,
        "cold": {f"{w}/{v}": conv(r) for (w, v), r in b.cold.items()},
        "sections": conv(b.sections),
        "failures": b.failures,
        "faults": {f"{v}/{r:g}": conv(x) for (v, r), x in b.faults.items()},
    }
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
