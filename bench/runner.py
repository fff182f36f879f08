# ruff: noqa: RUF001
"""``bench/run``: how much faster a container starts through alsd over an emulated WAN link.

One command, side by side in one run, every measurement repeated ``--reps`` times (median
and min-max):

1. cold start (``podman pull`` + ``podman run``, image absent, alsd state and page cache
   empty) and bytes across the link, for: full gzip pull; podman's own partial pull of
   zstd:chunked (``enable_partial_images``); alsd with eStargz (no optimisation), eStargz
   with prioritised files (traced run) and zstd:chunked;
2. warm start (the same ``podman run`` again);
3. read throughput of a 100 MB file through ``diff/`` (cold, chunk store, page cache) vs a
   local directory;
4. metadata: ``find`` + stat over an ~8000-file layer, first and second pass, vs local;
5. restart with 50 layers cached: time until a lookup answers, bytes fetched;
6. memory: alsd RSS with those layers, and per 100 000 TOC entries (bench/index_memory.py).

Cold and warm starts run with the host's podman, and with ``--podman host,other`` also
with the other Debian release's podman (the chroot ``.ci/build-chroot`` builds; podman 4.3
asks alsd for layers by blob digest, 5.4 by TOC digest). Writes ``bench/results/<date>.md``
and ``<date>-cold-start.png``. Benchmarks print
figures; nothing here passes or fails, and a variant that fails is reported with its reason.
Needs root (FUSE, podman, drop_caches). Synchronous; the WAN proxy runs in its own thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from alsd.tools.convert import with_runtime_files  # noqa: E402
from bench import ctrremote  # noqa: E402
from bench import registry as reg  # noqa: E402
from bench import workloads as wl  # noqa: E402
from bench.pagecache import large_folio_share  # noqa: E402
from bench.stargzstore import StargzStore  # noqa: E402
from bench.wanproxy import WanProxy  # noqa: E402
from tests.support.daemon import AlsdProcess, start_alsd  # noqa: E402
from tests.support.podman import (  # noqa: E402
    OTHER_ROOT_ENV,
    OtherRoot,
    PodmanEnv,
    other_root_unavailable,
    parse_version,
    protocol_for,
)

log = wl.log

# alsd as a user would run it (defaults), but quieter than the test helper's debug log.
ALSD_SETTINGS: dict[str, Any] = {"log_level": "info", "prefetch.background": True}

# The restart figure is about serving known layers from the state directory. With the
# background fetch on, a fetch the previous run left unfinished resumes at start-up and its
# bytes would be counted too (checked: 1 connection and up to ~200 KB with it, 0 without).
RESTART_SETTINGS: dict[str, Any] = {"prefetch.background": False}

# Page-cache throughput is the median of this many back-to-back reads (see _steady_read_s).
PAGECACHE_READS = 5
# Reads with the page cache dropped, per repetition, of the chunk store and the local copy.
DISK_READS = 3

PARTIAL_PULL_OPTIONS = (
    'pull_options = {enable_partial_images = "true", use_hard_links = "false", ostree_repos = ""}\n'
)


# ---------------------------------------------------------------------- small helpers


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def drop_file_pages(path: Path) -> None:
    """Drop one file's pages from the page cache (for a FUSE file: only the mount's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path) -> int:
    buf = bytearray(1 << 20)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def _steady_read_s(path: Path, n: int = PAGECACHE_READS) -> float:
    """Median time of ``n`` back-to-back reads of a file already in the page cache.

    One read of 100 MB from the page cache lasts ~15 ms, short enough for a timer tick or
    a page-cache LRU shuffle to move it by a third; the median of several is what a
    reader of hot data sees."""
    return statistics.median(timed(partial(read_file, path))[0] for _ in range(n))


def count_find(path: Path) -> int:
    # -printf with size and mtime makes find lstat every entry, like `ls -lR` would.
    out = subprocess.run(
        ["find", str(path), "-printf", "%s %T@ %m\n"], capture_output=True, check=True
    ).stdout
    return out.count(b"\n")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.monotonic()
    r = fn()
    return time.monotonic() - t, r


@dataclass
class Stat:
    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def ok(self) -> bool:
        return bool(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def fmt(self, unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
        if not self.values:
            return "failed" if self.errors else "n/a"
        m = self.median / scale
        if len(self.values) == 1:
            return f"{m:.{digits}f} {unit}".strip()
        lo, hi = min(self.values) / scale, max(self.values) / scale
        return f"{m:.{digits}f} {unit}".strip() + f" ({lo:.{digits}f}–{hi:.{digits}f})"


def failure_reason(exc: BaseException) -> str:
    """The telling line of a failure: podman's "Error:" or a Go panic, else the last lines."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    for marker in ("panic:", "Error:", "error:"):
        for x in lines:
            if marker in x:
                return x[x.index(marker) :][:300]
    return " ".join(lines[-3:])[:300] or type(exc).__name__


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------- the bench


@dataclass(frozen=True)
class Image:
    """One image variant in the registry: its tag and who made it."""

    tag: str
    label: str
    prioritised: bool = False


# Images a lazy-pulling store can serve, in report order. "ctr-remote" ones come from
# Debian's stargz-snapshotter (bench/ctrremote.py), the others from alsd's own converter
# (alsd.oci.estargz_writer) and from `podman push`.
IMAGES = {
    "esgz": Image("esgz", "eStargz (alsd convert)"),
    "esgz-prio": Image("esgz-prio", "eStargz prioritised (alsd convert)", prioritised=True),
    "zstdchunked": Image("zstdchunked", "zstd:chunked (podman push)"),
    "ctr-esgz-prio": Image("ctr-esgz-prio", "eStargz prioritised (ctr-remote "
                           "--estargz-record-in)", prioritised=True),
    "ctr-esgz": Image("ctr-esgz", "eStargz (ctr-remote)"),
    "ctr-zstd": Image("ctr-zstd", "zstd:chunked (ctr-remote --zstdchunked)"),
}  # fmt: skip
CTR_KINDS = {"ctr-esgz": "esgz", "ctr-esgz-prio": "esgz-prio", "ctr-zstd": "zstd"}


@dataclass
class Variant:
    key: str
    label: str
    tag: str
    store: str = ""  # "", "alsd" or "stargz-store": the Additional Layer Store podman uses
    partial: bool = False
    image: str = ""  # key of IMAGES for the stores' variants
    # Prefetch profiles (issue 15): the image is copied to bench/<workload>-profiled, run
    # once through alsd (which records what it reads) and the profile pushed there with
    # `alsd profile push`; the cold start then runs on fresh alsd state ("another host").
    profile: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # alsd.toml keys, dotted

    @property
    def als(self) -> bool:
        return bool(self.store)


# Images measured again with a prefetch profile pushed next to them (issue 15).
PROFILED_IMAGES = ("esgz", "zstdchunked", "ctr-zstd")

# Keys of the alsd variants on alsd's own images stay what they were (earlier results).
_ALSD_KEYS = {"esgz": "alsd-esgz", "esgz-prio": "alsd-esgz-prio", "zstdchunked": "alsd-zstd"}

VARIANTS = [
    Variant("gzip", "gzip, full pull (podman)", "gzip"),
    Variant("zstd-partial", "zstd:chunked, podman partial pull", "zstdchunked", partial=True),
    *(Variant(_ALSD_KEYS.get(k, f"alsd-{k}"), f"alsd, {im.label}", im.tag, "alsd", image=k)
      for k, im in IMAGES.items()),
    *(Variant(f"sgz-{k}", f"stargz-store, {im.label}", im.tag, "stargz-store", image=k)
      for k, im in IMAGES.items()),
    # alsd as it was before prefetch profiles: no registry lookup, no recording.
    Variant("alsd-esgz-noprofiles", f"alsd, {IMAGES['esgz'].label}, profiles off", "esgz",
            "alsd", image="esgz",
            settings={"prefetch.profiles": False, "prefetch.record": False}),
    *(Variant(f"{_ALSD_KEYS.get(k, f'alsd-{k}')}-profile",
              f"alsd, {IMAGES[k].label} + pushed profile", IMAGES[k].tag, "alsd", image=k,
              profile=True)
      for k in PROFILED_IMAGES),
]  # fmt: skip


@dataclass
class ColdResult:
    pull: Stat = field(default_factory=Stat)
    run: Stat = field(default_factory=Stat)
    total: Stat = field(default_factory=Stat)
    warm: Stat = field(default_factory=Stat)
    bytes_pull: Stat = field(default_factory=Stat)
    bytes_run: Stat = field(default_factory=Stat)
    bytes_total: Stat = field(default_factory=Stat)
    rss: Stat = field(default_factory=Stat)


@dataclass
class AlsdSession:
    """One repetition's directory and the alsd running in it (see Bench.alsd_session)."""

    dir: Path
    als: AlsdProcess | None = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache: Path = args.cache_dir
        self.work: Path = args.workdir
        self.registry: reg.Registry | None = None
        self.proxy: WanProxy | None = None
        # Cold-start runs in report order: (label, workload, podman generation). The label
        # keys self.cold: the workload's name with the host's podman, else with the version.
        self.cold_runs: list[tuple[str, str, str]] = []
        self.other_root: Path | None = None
        self._cleanups: list[Callable[[], None]] = []
        self.podman_versions: dict[str, str] = {}  # generation -> `podman --version`
        self.images: dict[str, dict[str, Any]] = {}  # workload -> facts
        self.cold: dict[tuple[str, str], ColdResult] = {}
        self.sections: dict[str, dict[str, Any]] = {}
        self.failures: list[str] = []
        self.faults: dict[Any, Any] = {}  # bench.faults.run_faults's result
        self._n = 0

    # ---- environment ----

    @property
    def podman_version(self) -> str:
        """The host's podman (`podman --version`), once run() has asked it."""
        return self.podman_versions.get("host", "")

    def fresh_dir(self, prefix: str, gen: str = "host") -> Path:
        """A fresh directory that podman generation ``gen`` can see (for "other": inside
        its chroot, at the same path there as the workdir here)."""
        self._n += 1
        base = self.work
        if gen != "host":
            assert self.other_root is not None
            base = self.other_root / str(self.work).lstrip("/")
        # Short on purpose: with a long runroot path podman 4.3 misses conmon's exit
        # notification and every `podman run` waits out its 20 s conmon timeout.
        d = base / f"{prefix}{self._n}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def podman(
        self, d: Path, als_mount: Path | None = None, partial: bool = False, gen: str = "host"
    ) -> PodmanEnv:
        chroot = None if gen == "host" else self.other_root
        env = PodmanEnv(generation=gen, dir=d, chroot=chroot, als_mount=als_mount)
        env.write_configs((), None)
        if partial:
            with open(d / "storage.conf", "a") as f:
                f.write(PARTIAL_PULL_OPTIONS)
        env.version_tuple = parse_version(env.run("--version").stdout)
        return env

    def alsd(self, d: Path, section: dict[str, Any] | None = None, **kw: Any) -> AlsdProcess:
        conf = self.work / "alsd-registries.conf"
        if not conf.exists():
            conf.write_text(
                'unqualified-search-registries = []\n\n[[registry]]\nlocation = "127.0.0.1"\n'
                "insecure = true\n"
            )
        settings = {**ALSD_SETTINGS, **(section or {}), **self.args.alsd_settings}
        return start_alsd(d, registries_conf=conf, settings=settings, **kw)

    def blob_digest_generation(self, gen: str) -> bool:
        """Whether podman generation ``gen`` asks a store for layers by blob digest (podman
        <= 5.0), the only generation stargz-store v0.12 speaks."""
        return protocol_for(parse_version(self.podman_versions[gen])) == "blob-digest"

    @property
    def link(self) -> str:
        assert self.proxy is not None
        return self.proxy.address

    def ref(self, workload: str, tag: str) -> str:
        return f"{self.link}/bench/{workload}:{tag}"

    # ---- images ----

    def push_workload(self, w: wl.Workload) -> None:
        assert self.registry is not None
        addr = self.registry.address
        facts: dict[str, Any] = {"description": w.description, "cmd": " ".join(w.cmd)}
        self.images[w.name] = facts
        tar = wl.layer_tar(self.cache, w)
        facts["tar_size"] = tar.stat().st_size
        facts["files"] = sum(1 for _ in Path(wl.rootfs(self.cache, w)).rglob("*"))
        diff_id = wl.tar_diff_id(tar)
        # zstd:chunked first, from a fresh store into a fresh registry, so podman's blob-info
        # cache has nothing to substitute (environment.md). Each podman generation pushes
        # its own: podman 5.4 cannot pull the 2020 layout that podman 4.3 writes (its
        # DiffID check fails), and a user of either pushes with the podman they have.
        for gen in self.args.podman:
            try:
                self._push_zstdchunked(w, tar, gen, facts)
            except Exception as exc:
                self.fail(f"{w.name}: zstd:chunked push ({self.podman_versions[gen]})", exc)
        gz = wl.gzip_blob(self.cache, w)
        blob = reg.BlobRef.from_file(gz, reg.LAYER_GZIP, digest=wl._sidecar(
            gz, lambda: {"digest": wl.sha256_file(gz)})["digest"])  # fmt: skip
        reg.push_image(addr, f"bench/{w.name}", "gzip", [blob], [diff_id], w.cmd)
        facts["gzip_size"] = blob.size
        noopt = wl.estargz_blob(self.cache, w.name, tar, ())
        self._push_esgz(w, "esgz", noopt)
        facts["esgz_size"] = noopt.size
        facts["esgz_digest"] = noopt.digest
        # What `alsd convert --prioritize-from <trace>` would prioritise: the traced files
        # behind the ones the runtime reads while it creates the container.
        traced = list(with_runtime_files(wl.traced_files(self.cache, w)))
        facts["traced_files"] = len(traced)
        facts["traced_bytes"] = wl.trace_bytes(self.cache, w, traced)
        prio = wl.estargz_blob(self.cache, w.name, tar, traced)
        self._push_esgz(w, "esgz-prio", prio)
        facts["esgz_prio_size"] = prio.size
        facts["prio_compressed_bytes"] = prio.prefetch_end
        # image key -> compressed bytes of the traced files' chunks + TOC
        facts.setdefault("read_set", {})
        with contextlib.suppress(Exception):
            facts["read_set"]["esgz"] = wl.read_set_bytes(noopt.path, noopt.annotations(), traced)
            facts["read_set"]["esgz-prio"] = wl.read_set_bytes(prio.path, prio.annotations(),
                                                               traced)  # fmt: skip
        self._push_ctr_remote(w, blob.digest, traced, facts)

    def _push_ctr_remote(self, w: wl.Workload, gzip_digest: str, traced: Sequence[str],
                         facts: dict[str, Any]) -> None:  # fmt: skip
        """The images ctr-remote converts from the gzip one (cached; bench/ctrremote.py)."""
        assert self.registry is not None
        wanted = {k: kind for k, kind in CTR_KINDS.items()
                  if any(v.image == k for v in self.selected_variants())}  # fmt: skip
        if not wanted:
            return
        why = ctrremote.available()
        if why is not None:
            self.fail(f"{w.name}: ctr-remote images", RuntimeError(why))
            return
        facts["ctr_remote"] = ctrremote.tool_version()
        try:
            layers = ctrremote.convert_all(
                self.cache, self.work, self.registry.address, w.name, "gzip", gzip_digest,
                traced, list(wanted.values()),
            )  # fmt: skip
        except Exception as exc:
            self.fail(f"{w.name}: ctr-remote conversion", exc)
            return
        for k, kind in wanted.items():
            lay = layers[kind]
            reg.push_image(self.registry.address, f"bench/{w.name}", k, [lay.blob_ref()],
                           [lay.diff_id], w.cmd)  # fmt: skip
            facts[f"{k}_size"] = lay.size
            with contextlib.suppress(Exception):
                facts["read_set"][k] = wl.read_set_bytes(lay.path, lay.annotations, traced,
                                                         lay.media_type)  # fmt: skip

    def selected_variants(self) -> list[Variant]:
        """The cold-start variants this run measures (stargz-store's only with its path)."""
        a = self.args
        return [v for v in VARIANTS if v.key in a.variants
                and (v.store != "stargz-store" or a.compare_stargz_store is not None)]  # fmt: skip

    def _push_zstdchunked(self, w: wl.Workload, tar: Path, gen: str, facts: dict[str, Any]) -> None:
        assert self.registry is not None
        addr = self.registry.address
        tag = zstd_tag(gen)
        d = self.fresh_dir("p", gen)
        env = self.podman(d, gen=gen)
        try:
            src = tar
            if gen != "host":
                # The chroot's podman sees only what lies inside it.
                src = d / tar.name
                try:
                    os.link(tar, src)
                except OSError:
                    shutil.copyfile(tar, src)
            cmd_json = json.dumps(list(w.cmd))
            env.run("import", "--change", f"CMD {cmd_json}", env.podman_path(src),
                    f"localhost/bench-{w.name}")  # fmt: skip
            log(f"podman push --compression-format zstd:chunked bench/{w.name}:{tag} "
                f"({self.podman_versions[gen]})")  # fmt: skip
            env.run("push", "--compression-format", "zstd:chunked", f"localhost/bench-{w.name}",
                    f"docker://{addr}/bench/{w.name}:{tag}", timeout=1200)  # fmt: skip
        finally:
            env.teardown()
        m = reg.get_manifest(addr, f"bench/{w.name}", tag)
        lay = m["layers"][0]
        if "zstd" not in lay["mediaType"] or not any(
            "zstd-chunked" in k for k in lay.get("annotations", {})
        ):
            raise RuntimeError(f"podman pushed {lay['mediaType']} without zstd:chunked annotations")
        facts["zstdchunked_size" if gen == "host" else "zstdchunked_other_size"] = lay["size"]
        if gen == "host":
            # The read set of podman's blob (it is not in the cache: podman pushes anew).
            tmp = self.work / f"zstd-{w.name}.blob"
            try:
                ctrremote.fetch_blob(addr, f"bench/{w.name}", lay["digest"], tmp)
                facts.setdefault("read_set", {})["zstdchunked"] = wl.read_set_bytes(
                    tmp, lay.get("annotations", {}),
                    with_runtime_files(wl.traced_files(self.cache, w)), lay["mediaType"],
                )  # fmt: skip
            except Exception as exc:
                log(f"  (no read set for podman's zstd:chunked: {exc})")
            finally:
                tmp.unlink(missing_ok=True)

    def _push_esgz(self, w: wl.Workload, tag: str, b: wl.EsgzBlob) -> None:
        assert self.registry is not None
        blob = reg.BlobRef.from_file(b.path, reg.LAYER_GZIP, digest=b.digest,
                                     annotations=b.annotations())  # fmt: skip
        reg.push_image(self.registry.address, f"bench/{w.name}", tag, [blob], [b.diff_id], w.cmd)

    def push_single_layer(self, repo: str, tar: Path, prio: Sequence[str] = ()) -> wl.EsgzBlob:
        assert self.registry is not None
        b = wl.estargz_blob(self.cache, tar.stem, tar, prio)
        blob = reg.BlobRef.from_file(b.path, reg.LAYER_GZIP, digest=b.digest,
                                     annotations=b.annotations())  # fmt: skip
        reg.push_image(self.registry.address, repo, "esgz", [blob], [b.diff_id], ["true"])
        return b

    # ---- 1+2: cold and warm start ----

    def cold_start(
        self,
        w: wl.Workload,
        v: Variant,
        res: ColdResult,
        expect: str,
        gen: str = "host",
        inspect: Callable[[AlsdProcess], None] | None = None,
    ) -> None:
        """One cold start (and a warm one) into ``res``; ``inspect`` sees alsd after them."""
        d = self.fresh_dir("c", gen)
        store: AlsdProcess | StargzStore | None = None
        env: PodmanEnv | None = None
        ref = self.variant_ref(w, v, gen)
        assert self.proxy is not None
        try:
            if v.store == "alsd":
                store = self.alsd(d / "a", v.settings)
            elif v.store == "stargz-store":
                assert self.args.compare_stargz_store is not None
                store = StargzStore(self.args.compare_stargz_store, d / "s", [self.link]).start()
            env = self.podman(d / "p", store.mountpoint if store else None, v.partial, gen)
            drop_caches()
            self.proxy.reset()
            t_pull, _ = timed(lambda: env.run("pull", "-q", ref, timeout=1200))
            b_pull = self.proxy.stats()["down_bytes"]
            self.proxy.reset()
            t_run, out = timed(lambda: env.run("run", "--rm", ref, timeout=1200))
            b_run = self.proxy.stats()["down_bytes"]
            if expect not in out.stdout:
                raise RuntimeError(f"unexpected output {out.stdout[-200:]!r}")
            if store is not None:
                if not self._als_used(env):
                    raise RuntimeError("podman did not use the additional layer store")
                assert store.proc is not None
                res.rss.add(rss_bytes(store.proc.pid))
            t_warm, _ = timed(lambda: env.run("run", "--rm", ref, timeout=600))
            if inspect is not None and isinstance(store, AlsdProcess):
                inspect(store)
            res.pull.add(t_pull)
            res.run.add(t_run)
            res.total.add(t_pull + t_run)
            res.warm.add(t_warm)
            res.bytes_pull.add(b_pull)
            res.bytes_run.add(b_run)
            res.bytes_total.add(b_pull + b_run)
            log(f"  {w.name} {v.key}: pull {t_pull:.2f}s run {t_run:.2f}s warm {t_warm:.2f}s "
                f"{mb(b_pull + b_run)}")  # fmt: skip
        except Exception as exc:
            reason = failure_reason(exc)
            res.pull.errors.append(reason)
            self.failures.append(f"cold start {w.name} / {v.label}: {reason}")
            log(f"  {w.name} {v.key}: FAILED {reason}")
            if store is not None:
                (self.work / f"failed-{w.name}-{v.key}.log").write_text(store.log_tail(1500))
        finally:
            if env is not None:
                env.teardown()
            if store is not None:
                with contextlib.suppress(Exception):
                    store.cleanup()
                if self.args.keep_logs is not None:
                    self.args.keep_logs.mkdir(parents=True, exist_ok=True)
                    n = len(res.total.values) + len(res.pull.errors)
                    name = f"{w.name}-{gen}-{v.key}-{n}.log"
                    with contextlib.suppress(OSError):
                        shutil.copyfile(store.log_path, self.args.keep_logs / name)
            shutil.rmtree(d, ignore_errors=True)

    def variant_ref(self, w: wl.Workload, v: Variant, gen: str) -> str:
        tag = zstd_tag(gen) if v.tag == "zstdchunked" else v.tag
        return self.ref(f"{w.name}-profiled" if v.profile else w.name, tag)

    def learn_profile(self, w: wl.Workload, v: Variant, gen: str) -> None:
        """Copy the variant's image to its own repository, run it once through alsd (which
        records what the container reads; stopped with SIGTERM, it saves the recording)
        and attach the profile there with `alsd profile push` (tag schema: the registry
        has no referrers API). Not timed."""
        assert self.registry is not None
        tag = zstd_tag(gen) if v.tag == "zstdchunked" else v.tag
        addr = self.registry.address
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
             "--dest-tls-verify=false", f"docker://{addr}/bench/{w.name}:{tag}",
             f"docker://{addr}/bench/{w.name}-profiled:{tag}"],
            check=True, capture_output=True, timeout=1200,
        )  # fmt: skip
        ref = self.variant_ref(w, v, gen)
        d = self.fresh_dir("l", gen)
        als = self.alsd(d / "a")
        env: PodmanEnv | None = None
        try:
            env = self.podman(d / "p", als.mountpoint, False, gen)
            env.run("run", "--rm", ref, timeout=1200)
            env.teardown()
            env = None
            als.stop()
            cli = [sys.executable, "-m", "alsd", "profile"]
            penv = dict(os.environ, PYTHONPATH=str(REPO))
            show = subprocess.run([*cli, "show", "--config", str(als.config_path), ref],
                                  capture_output=True, text=True, env=penv, check=True)  # fmt: skip
            doc = json.loads(show.stdout)
            push = subprocess.run([*cli, "push", "--config", str(als.config_path), ref],
                                  capture_output=True, text=True, env=penv, check=True)  # fmt: skip
            facts = self.images[w.name].setdefault("profiles", {})
            facts[f"{v.image}/{gen}"] = {
                "entries": sum(len(la["entries"]) for la in doc["layers"]),
                "compressed_bytes": sum(la["compressed_bytes"] or 0 for la in doc["layers"]),
                "pushed": push.stdout.strip(),
            }
            log(f"  {w.name} {v.key} ({gen}): profile of "
                f"{facts[f'{v.image}/{gen}']['entries']} files pushed")  # fmt: skip
        finally:
            if env is not None:
                env.teardown()
            with contextlib.suppress(Exception):
                als.cleanup()
            shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def _als_used(env: PodmanEnv) -> bool:
        """A layer of the store is a symlink into the ALS (spec.md §1.7)."""
        overlay = env.graphroot / "overlay"
        return any((p / "additionallayer").exists() for p in overlay.iterdir() if p.is_dir())

    # ---- 3: read throughput ----

    def read_throughput(self) -> None:
        sec: dict[str, Any] = {}
        self.sections["read"] = sec
        tar = wl.bigfile_tar(self.cache)
        b = self.push_single_layer("bench/bigfile", tar)
        size = 0
        local_dir = self.work / "local-bigfile"
        shutil.rmtree(local_dir, ignore_errors=True)
        local_dir.mkdir()
        with tarfile.open(tar) as tf:
            tf.extractall(local_dir)
        local = local_dir / "big.bin"
        size = local.stat().st_size
        sec["size"] = size
        sec["pagecache_reads"] = PAGECACHE_READS
        sec["disk_reads"] = DISK_READS
        names = ["cold", "chunkstore", "chunkstore_cached", "pagecache", "local_disk",
                 "local_pagecache"]  # fmt: skip
        stats = {n: Stat() for n in names}
        bytes_cold = Stat()
        assert self.proxy is not None
        for _ in range(self.args.reps):
            with self.alsd_session("r", "read throughput", stats["cold"].errors) as s:
                als = s.als = self.alsd(s.dir)
                layer = als.layer_dir(self.ref("bigfile", "esgz"), b.digest)
                path = layer / "diff" / "big.bin"
                os.stat(layer / "diff")  # resolve the layer (TOC) outside the timing
                drop_caches()
                self.proxy.reset()
                t, n = timed(partial(read_file, path))
                assert n == size, f"read {n} of {size} bytes"
                stats["cold"].add(size / t)
                bytes_cold.add(self.proxy.stats()["down_bytes"])
                # Disk reads are noisy here: several per repetition, alsd's and the local
                # copy's in turn, so that drift hits both alike.
                for _ in range(DISK_READS):
                    drop_caches()
                    t, _ = timed(partial(read_file, path))
                    stats["chunkstore"].add(size / t)
                    drop_caches()
                    t, _ = timed(partial(read_file, local))
                    stats["local_disk"].add(size / t)
                # Once more with the chunk files in the page cache and only the mount's
                # pages dropped: what serving through FUSE costs alsd, without the disk.
                read_file(path)
                drop_file_pages(path)
                t, _ = timed(partial(read_file, path))
                stats["chunkstore_cached"].add(size / t)
                stats["pagecache"].add(size / _steady_read_s(path))
                sec["large_folios"] = large_folio_share(path)
            stats["local_pagecache"].add(size / _steady_read_s(local))
            sec["local_large_folios"] = large_folio_share(local)
        shutil.rmtree(local_dir, ignore_errors=True)
        sec.update(stats)
        sec["bytes_cold"] = bytes_cold
        sec["blob_size"] = b.size

    # ---- 4: metadata ----

    def metadata(self, w: wl.Workload) -> None:
        sec: dict[str, Any] = {"workload": w.name}
        self.sections["metadata"] = sec
        digest = self.images[w.name]["esgz_digest"]
        stats = {n: Stat() for n in ("lookup", "first", "second", "local_first", "local_second")}
        entries = 0
        local = wl.rootfs(self.cache, w)
        for _ in range(self.args.reps):
            with self.alsd_session("m", "metadata", stats["first"].errors) as s:
                als = s.als = self.alsd(s.dir)
                diff = als.layer_dir(self.ref(w.name, "esgz"), digest) / "diff"
                t, _ = timed(partial(os.stat, diff))
                stats["lookup"].add(t)
                drop_caches()
                t, entries = timed(partial(count_find, diff))
                stats["first"].add(t)
                before = als.status()["fuse"]["requests"]
                t, _ = timed(partial(count_find, diff))
                stats["second"].add(t)
                after = als.status()["fuse"]["requests"]
                # The status request itself is not a FUSE request: this is the pass alone.
                sec["second_requests"] = {
                    op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)
                }
            drop_caches()
            t, n_local = timed(lambda: count_find(local))
            stats["local_first"].add(t)
            t, _ = timed(lambda: count_find(local))
            stats["local_second"].add(t)
        sec.update(stats)
        sec["entries"] = entries
        sec["local_entries"] = n_local

    # ---- 5+6: restart and memory ----

    def restart_memory(self, n_layers: int = 50) -> None:
        sec: dict[str, Any] = {"layers": n_layers}
        self.sections["restart"] = sec
        assert self.registry is not None and self.proxy is not None
        blobs: list[wl.EsgzBlob] = []
        files = self.args.files_per_layer
        for i in range(n_layers):
            tar = wl.small_files_tar(self.cache, i, files)
            blobs.append(wl.estargz_blob(self.cache, tar.stem, tar, ()))
        layers = [reg.BlobRef.from_file(b.path, reg.LAYER_GZIP, digest=b.digest,
                                        annotations=b.annotations()) for b in blobs]  # fmt: skip
        reg.push_image(self.registry.address, "bench/many", "esgz", layers,
                       [b.diff_id for b in blobs], ["true"])  # fmt: skip
        ref = self.ref("many", "esgz")
        sec["toc_entries"] = n_layers * (files + 1)
        stats = {n: Stat() for n in ("first_lookup", "all_lookups", "mount")}
        bytes_restart = Stat()
        conns_restart = Stat()
        rss_idle = Stat()
        rss_loaded = Stat()
        rss_restarted = Stat()
        for _ in range(max(1, min(self.args.reps, 3))):
            with self.alsd_session("s", "restart", stats["first_lookup"].errors) as s:
                als = s.als = self.alsd(s.dir, RESTART_SETTINGS)
                time.sleep(0.5)  # let start-up allocations settle before the baseline
                rss_idle.add(rss_bytes(als.proc.pid))
                for b in blobs:
                    diff = als.layer_dir(ref, b.digest) / "diff"
                    os.listdir(diff)
                rss_loaded.add(rss_bytes(als.proc.pid))
                als.stop()
                self.proxy.reset()
                t0 = time.monotonic()
                als = s.als = self.alsd(s.dir, RESTART_SETTINGS, wait=False)
                first = als.layer_dir(ref, blobs[0].digest) / "diff"
                t_mount = None
                deadline = t0 + 60
                while True:
                    if t_mount is None and os.path.ismount(als.mountpoint):
                        t_mount = time.monotonic() - t0
                    if t_mount is not None:
                        with contextlib.suppress(OSError):
                            os.stat(first)
                            break
                    if als.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"restarted alsd did not answer: {als.log_tail(800)}")
                    time.sleep(0.005)
                t_first = time.monotonic() - t0
                for b in blobs:
                    os.stat(als.layer_dir(ref, b.digest) / "diff")
                t_all = time.monotonic() - t0
                stats["mount"].add(t_mount or float("nan"))
                stats["first_lookup"].add(t_first)
                stats["all_lookups"].add(t_all)
                bytes_restart.add(self.proxy.stats()["down_bytes"])
                conns_restart.add(self.proxy.stats()["connections"])
                for b in blobs:
                    os.listdir(als.layer_dir(ref, b.digest) / "diff")
                rss_restarted.add(rss_bytes(als.proc.pid))
        sec.update(stats)
        sec["bytes"] = bytes_restart
        sec["connections"] = conns_restart
        sec["rss_idle"] = rss_idle
        sec["rss_loaded"] = rss_loaded
        sec["rss_restarted"] = rss_restarted
        try:
            out = subprocess.run(
                [sys.executable, "-m", "bench.index_memory", "100000"], cwd=REPO,
                capture_output=True, text=True, check=True, timeout=600,
            ).stdout  # fmt: skip
            sec["index_memory"] = out.strip()
        except Exception as exc:
            sec["index_memory"] = f"failed: {exc}"

    @contextlib.contextmanager
    def alsd_session(self, prefix: str, what: str, errors: list[str]) -> Iterator[AlsdSession]:
        """A fresh directory for one repetition with alsd: whatever fails inside is recorded
        (in ``errors`` and the report's failures) and the run goes on; alsd (``.als``,
        which the body sets and may replace) is stopped and the directory removed."""
        s = AlsdSession(self.fresh_dir(prefix))
        try:
            yield s
        except Exception as exc:
            errors.append(str(exc)[:300])
            self.fail(what, exc, s.als)
        finally:
            if s.als is not None:
                with contextlib.suppress(Exception):
                    s.als.cleanup()
            shutil.rmtree(s.dir, ignore_errors=True)

    def fail(self, what: str, exc: BaseException, als: AlsdProcess | None = None) -> None:
        msg = f"{what}: {type(exc).__name__}: {str(exc).strip()[:400]}"
        if als is not None:
            msg += f"\n    alsd log tail: {als.log_tail(600)!r}"
        self.failures.append(msg)
        log(f"FAILED {msg}")
        if self.args.verbose:
            traceback.print_exc()

    # ---- driver ----

    def run(self) -> Path:
        a = self.args
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.podman_versions["host"] = subprocess.run(
            ["podman", "--version"], capture_output=True, text=True
        ).stdout.strip()
        if "other" in a.podman:
            self.other_root = other_podman_root()
            holder = OtherRoot(self.other_root)
            holder.acquire()
            self._cleanups.append(holder.release)
            ver = subprocess.run(["chroot", str(self.other_root), "podman", "--version"],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            self.podman_versions["other"] = ver.stdout.strip()
        workloads = [wl.WORKLOADS[n] for n in a.workloads]
        for w in workloads:  # build everything before any timing starts
            wl.layer_tar(self.cache, w)
            wl.gzip_blob(self.cache, w)
        self.registry = reg.Registry(self.work / "registry").start()
        self.proxy = WanProxy(("127.0.0.1", self.registry.port), rate_mbit=a.rate_mbit,
                              rtt_ms=a.rtt_ms).start()  # fmt: skip
        log(f"registry {self.registry.address}, link {self.proxy.address} "
            f"({a.rate_mbit} Mbit/s, {a.rtt_ms} ms RTT)")  # fmt: skip
        t_start = time.monotonic()
        try:
            for w in workloads:
                self.push_workload(w)
            variants = self.selected_variants()
            for gen in a.podman:
                for w in workloads:
                    for v in variants:
                        if v.profile:
                            try:
                                self.learn_profile(w, v, gen)
                            except Exception as exc:
                                self.fail(f"{w.name}: learning the profile of {v.key} ({gen})",
                                          exc)  # fmt: skip
            for gen in a.podman:
                for w in workloads:
                    label = w.name if gen == "host" else f"{w.name}, {self.podman_versions[gen]}"
                    self.cold_runs.append((label, w.name, gen))
                    expect = "hello from python" if w.name == "python" else "det"
                    for rep in range(a.reps):
                        # Interleave variants per repetition so drift hits all of them alike.
                        for v in variants:
                            if v.store == "stargz-store" and not self.blob_digest_generation(gen):
                                continue  # it serves only podman <= 5.0
                            res = self.cold.setdefault((label, v.key), ColdResult())
                            log(f"cold start {label} / {v.key} ({rep + 1}/{a.reps})")
                            self.cold_start(w, v, res, expect, gen)
            if "read" in a.sections:
                log("read throughput")
                self.read_throughput()
            if "metadata" in a.sections:
                log("metadata")
                self.metadata(workloads[0])
            if "restart" in a.sections:
                log("restart and memory")
                self.restart_memory()
            if "materialized" in a.sections:
                from bench.materialized import run_materialized

                log("materialized")
                self.sections["materialized"] = run_materialized(self, workloads)
            if "faults" in a.sections:
                from bench.faults import run_faults

                log("faults")
                self.faults = run_faults(self, workloads[0], "hello from python"
                                         if workloads[0].name == "python" else "det")  # fmt: skip
        finally:
            self.proxy.stop()
            self.registry.stop()
            for cleanup in reversed(self._cleanups):
                cleanup()
            # The pushed images are rebuilt from the cache next time; 0.5-1.5 GB.
            shutil.rmtree(self.registry.workdir, ignore_errors=True)
        self.duration = time.monotonic() - t_start
        from bench.report import write_report

        return write_report(self, a.out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    p.add_argument("--quick", action="store_true", help="1 repetition, python workload only")
    p.add_argument(
        "--workloads", default="python,scipy", help=f"comma list of {','.join(wl.WORKLOADS)}"
    )
    p.add_argument(
        "--variants",
        default=",".join(v.key for v in VARIANTS),
        help="comma list of cold-start variants",
    )
    p.add_argument(
        "--sections",
        default="read,metadata,restart",
        help="comma list of extra sections: read,metadata,restart,materialized,faults",
    )
    p.add_argument(
        "--fault-reps", type=int, default=3,
        help="repetitions of each (format, fault rate) cold start of the faults section",
    )  # fmt: skip
    p.add_argument(
        "--podman",
        default="host",
        help="comma list of podman generations for the cold starts: host (this machine's "
        "podman), other (the other Debian release's, from the chroot .ci/build-chroot "
        "builds; $ALSD_OTHER_PODMAN_ROOT overrides where it is)",
    )
    p.add_argument(
        "--compare-stargz-store",
        type=Path,
        metavar="PATH",
        help="also run the cold starts through this stargz-store binary (the reference "
        "Additional Layer Store; v0.12 serves podman <= 5.0 only), side by side with alsd",
    )
    p.add_argument("--rate-mbit", type=float, default=100.0)
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--files-per-layer", type=int, default=2000)
    p.add_argument("--cache-dir", type=Path, default=wl.DEFAULT_CACHE)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/alsdb"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--alsd-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an alsd.toml setting (dotted key; value parsed as JSON, else a string), "
        "e.g. prefetch.background=false",
    )
    p.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy each cold start's store log (alsd's, stargz-store's) into DIR; with "
        "--alsd-setting log_level=debug, bench/misses.py DIR breaks the time of alsd's "
        "pull and misses down",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.reps = 1
        a.workloads = "python"
    a.workloads = [x for x in a.workloads.split(",") if x]
    a.variants = [x for x in a.variants.split(",") if x]
    a.sections = [x for x in a.sections.split(",") if x]
    a.podman = [x for x in a.podman.split(",") if x]
    if not a.podman or any(x not in ("host", "other") for x in a.podman):
        p.error("--podman takes a comma list of host, other")
    if a.compare_stargz_store is not None:
        a.compare_stargz_store = a.compare_stargz_store.resolve()
        if not os.access(a.compare_stargz_store, os.X_OK):
            p.error(f"--compare-stargz-store: {a.compare_stargz_store} is not executable")
    a.alsd_settings = {}
    for item in a.alsd_setting:
        key, _, value = item.partition("=")
        try:
            a.alsd_settings[key] = json.loads(value)
        except json.JSONDecodeError:
            a.alsd_settings[key] = value
    return a


def zstd_tag(gen: str) -> str:
    """The tag of the zstd:chunked image that podman generation ``gen`` pushed."""
    return "zstdchunked" if gen == "host" else "zstdchunked-other"


def other_podman_root() -> Path:
    """The chroot holding the other Debian release's podman (built if missing)."""
    if not os.environ.get(OTHER_ROOT_ENV):
        log("building or finding the other podman's chroot (.ci/build-chroot)")
        out = subprocess.run([str(REPO / ".ci" / "build-chroot")], capture_output=True,
                             text=True, check=True)  # fmt: skip
        os.environ[OTHER_ROOT_ENV] = out.stdout.strip().splitlines()[-1]
    reason = other_root_unavailable()
    if reason is not None:
        raise SystemExit(f"--podman other: {reason}")
    return Path(os.environ[OTHER_ROOT_ENV])


def _terminate(signum: int, frame: Any) -> None:
    # Unwind through every finally: alsd mounts, podman stores and the registry are torn down.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if os.geteuid() != 0:
        print("bench/run needs root (FUSE, podman, drop_caches)", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("installing matplotlib for the chart")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=False)
    out = Bench(args).run()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
