"""ChunkStore on real files: round trips, integrity, eviction, pinning, damage, full disks."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from alsd.errors import IntegrityError, StoreError
from alsd.storage.chunkstore import ChunkStore
from tests.support.tmpfs import run, small_tmpfs

REPO = Path(__file__).resolve().parents[3]


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(tag: int, size: int = 1000) -> bytes:
    """Distinct deterministic content per tag."""
    seed = hashlib.sha256(tag.to_bytes(4, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def disk_chunks(root: Path) -> dict[str, int]:
    """What is really on disk: final chunk files by hex name -> size."""
    out: dict[str, int] = {}
    for p in (root / "chunks" / "sha256").glob("*/*"):
        out[p.name] = p.stat().st_size
    return out


def assert_consistent(store: ChunkStore) -> None:
    """Accounting equals the files on disk, and tmp/ holds nothing."""
    store.check_invariants()
    on_disk = disk_chunks(store.root)
    st = store.stats()
    assert st["count"] == len(on_disk)
    assert st["bytes"] == sum(on_disk.values())
    for hx in on_disk:
        assert store.has("sha256:" + hx)
    assert list((store.root / "tmp").iterdir()) == []


def _evict_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages stay cached: write them first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _in_page_cache(path: Path) -> bool:
    """Whether any page of ``path`` is in the page cache (mincore(2) of a mapping: unlike
    a read, it does not start read-ahead)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(m)
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
        del anchor
        assert rc == 0, os.strerror(ctypes.get_errno())
        return any(v & 1 for v in vec)
    finally:
        m.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ChunkStore]:
    s = ChunkStore(tmp_path / "store", 10_000)
    await s.open()
    yield s
    await s.close()


async def test_round_trip_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = ChunkStore(root, 1 << 20)
    await s.open()
    data = blob(1, 5000)
    big = blob(2, 200_000)  # hashed in a worker thread
    assert not s.has(dg(data))
    assert await s.get(dg(data)) is None
    assert await s.put(dg(data), data) is True
    assert await s.put(dg(big), big) is True
    assert s.has(dg(data))
    assert await s.get(dg(data)) == data
    assert await s.get(dg(big)) == big
    assert s.path_for(dg(data)).read_bytes() == data
    st = s.stats()
    assert (st["count"], st["bytes"], st["hits"], st["misses"]) == (2, 205_000, 2, 1)
    assert_consistent(s)
    await s.close()

    s2 = ChunkStore(root, 1 << 20)
    await s2.open()
    assert s2.stats()["count"] == 2
    assert s2.stats()["unverified"] == 0  # closed cleanly: trusted
    assert await s2.get(dg(big)) == big
    assert_consistent(s2)
    await s2.close()


async def test_empty_chunk(store: ChunkStore) -> None:
    assert await store.put(dg(b""), b"") is True
    assert await store.get(dg(b"")) == b""


async def test_wrong_digest_raises_and_stores_nothing(store: ChunkStore) -> None:
    data = blob(1)
    wrong = dg(blob(2))
    with pytest.raises(IntegrityError):
        await store.put(wrong, data)
    big = blob(3, 300_000)
    with pytest.raises(IntegrityError):
        await store.put(dg(blob(4, 300_000)), big)
    for bad in ("sha256:XYZ", "md5:" + "0" * 32, "sha256:" + "A" * 64):
        with pytest.raises(IntegrityError):
            await store.put(bad, data)
        assert not store.has(bad)
        assert await store.get(bad) is None
    assert not store.has(wrong)
    assert disk_chunks(store.root) == {}
    assert_consistent(store)


async def test_same_digest_concurrently_is_stored_once(store: ChunkStore) -> None:
    data = blob(7, 3000)
    results = await asyncio.gather(*(store.put(dg(data), data) for _ in range(5)))
    assert results == [True] * 5
    assert store.stats()["count"] == 1
    assert await store.get(dg(data)) == data
    assert_consistent(store)


async def test_open_sweeps_tmp_and_strays(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = ChunkStore(root, 1 << 20)
    await s.open()
    good = blob(1)
    assert await s.put(dg(good), good)
    await s.close()

    # What a writer killed mid-put leaves behind, plus junk that is not a chunk.
    (root / "tmp" / ("ab" * 32 + ".123456")).write_bytes(b"partial")
    (root / "tmp" / "junkdir").mkdir()
    (root / "tmp" / "junkdir" / "x").write_bytes(b"x")
    misplaced = blob(2)
    hx = hashlib.sha256(misplaced).hexdigest()
    wrong_prefix = "00" if not hx.startswith("00") else "01"
    (root / "chunks" / "sha256" / wrong_prefix / hx).write_bytes(misplaced)
    (root / "chunks" / "sha256" / "ab" / "not-a-chunk").write_bytes(b"?")

    s2 = ChunkStore(root, 1 << 20)
    await s2.open()
    assert list((root / "tmp").iterdir()) == []
    assert not (root / "chunks" / "sha256" / wrong_prefix / hx).exists()
    assert not (root / "chunks" / "sha256" / "ab" / "not-a-chunk").exists()
    assert s2.stats()["count"] == 1
    assert await s2.get(dg(good)) == good
    assert_consistent(s2)
    await s2.close()


async def test_lru_eviction_keeps_recently_used(tmp_path: Path) -> None:
    s = ChunkStore(tmp_path / "store", 3000)
    await s.open()
    a, b, c, d = (blob(i) for i in range(4))
    for x in (a, b, c):
        assert await s.put(dg(x), x)
    assert await s.get(dg(a)) == a  # a is now more recent than b
    assert await s.put(dg(d), d)
    assert not s.has(dg(b))
    assert not s.path_for(dg(b)).exists()
    for x in (a, c, d):
        assert await s.get(dg(x)) == x
    assert s.stats()["evictions"] == 1
    assert_consistent(s)
    # A chunk that can never fit is declined, not stored, and evicts nothing.
    huge = blob(9, 3001)
    assert await s.put(dg(huge), huge) is False
    assert s.stats()["put_declined"] == 1
    assert s.stats()["count"] == 3
    assert_consistent(s)
    await s.close()


async def test_bytes_held_outside_share_the_limit(tmp_path: Path) -> None:
    """Materialised layers count against max_bytes: holding room evicts LRU chunks,
    demoted chunks go first, and what cannot fit is refused without evicting anything."""
    s = ChunkStore(tmp_path / "store", 4000)
    await s.open()
    a, b, c, d = (blob(i) for i in range(4))
    for x in (a, b, c, d):
        assert await s.put(dg(x), x)
    s.demote([dg(c), "sha256:" + "0" * 64, "junk"])  # c first, unknown ones ignored
    assert await s.hold_outside(1500)  # two chunks must go: c (demoted), then a (LRU)
    assert not s.has(dg(c)) and not s.has(dg(a)) and s.has(dg(b)) and s.has(dg(d))
    for _ in range(500):  # their files are unlinked in a worker thread
        if not s.path_for(dg(c)).exists() and not s.path_for(dg(a)).exists():
            break
        await asyncio.sleep(0.01)
    assert s.stats()["outside_bytes"] == 1500
    assert s.stats()["evictions"] == 2
    assert_consistent(s)
    # Puts now fit in what is left: 4000 - 1500 = 2500, two chunks.
    assert await s.put(dg(a), a)  # waits until the old file of a is gone
    assert not s.has(dg(b))
    assert await s.hold_outside(2501) is False
    assert s.has(dg(a)) and s.has(dg(d))  # a refused hold evicts nothing
    s.release_outside(1500)
    assert s.stats()["outside_bytes"] == 0
    assert await s.hold_outside(2000)
    await s.close()  # waits for the unlinks
    assert_consistent(s)


async def test_pinned_chunk_is_never_evicted(tmp_path: Path) -> None:
    s = ChunkStore(tmp_path / "store", 2000)
    await s.open()
    a, b, c, d, e = (blob(i) for i in range(5))
    assert await s.put(dg(a), a)
    assert await s.put(dg(b), b)
    with s.pinned(dg(a)):  # a is the LRU chunk, but pinned
        assert await s.put(dg(c), c)
        assert s.has(dg(a))
        assert not s.has(dg(b))
        with s.pinned(dg(c)):
            # Everything is pinned: no room can be made, so the put declines.
            assert await s.put(dg(d), d) is False
            assert not s.path_for(dg(d)).exists()
        assert await s.get(dg(a)) == a
        assert s.has(dg(a))
    # Unpinned again: a is LRU once c is touched, and goes first.
    assert await s.get(dg(c)) == c
    assert await s.put(dg(e), e)
    assert not s.has(dg(a))
    assert s.has(dg(c))
    assert_consistent(s)
    await s.close()


async def test_chunk_being_read_is_not_evicted(tmp_path: Path) -> None:
    s = ChunkStore(tmp_path / "store", 2000)
    await s.open()
    a, b = blob(1), blob(2)
    c = blob(3, 2000)  # needs the whole limit: both a and b would have to go
    assert await s.put(dg(a), a)
    assert await s.put(dg(b), b)
    # A read the page cache can serve needs no await (and no pin): make this one wait
    # for the disk, in a worker thread.
    _evict_from_page_cache(s.path_for(dg(a)))
    if _in_page_cache(s.path_for(dg(a))):
        pytest.skip("this filesystem keeps the chunk file cached")
    reader = asyncio.create_task(s.get(dg(a)))
    # One loop turn runs get() up to its file read in a worker thread: a is pinned now.
    await asyncio.sleep(0)
    assert s.stats()["pinned"] == 1
    # put() decides on room before its first await (small data is hashed inline), while
    # the read of a is still pending: a cannot go, so there is no room and nothing is
    # evicted. Unpinned, both would have been evicted for c.
    assert await s.put(dg(c), c) is False
    assert await reader == a
    assert s.has(dg(a)) and s.has(dg(b))
    assert s.stats()["evictions"] == 0
    assert await s.put(dg(c), c) is True
    assert not s.has(dg(a)) and not s.has(dg(b))
    assert_consistent(s)
    await s.close()


async def test_truncated_chunk_is_not_served(store: ChunkStore) -> None:
    data = blob(5, 4000)
    assert await store.put(dg(data), data)
    path = store.path_for(dg(data))
    os.truncate(path, 1000)
    assert await store.get(dg(data)) is None
    assert not store.has(dg(data))
    st = store.stats()
    assert st["corrupt"] == 1
    # The unlink of the bad file runs in a worker; a new put of the digest waits for it.
    assert await store.put(dg(data), data) is True
    assert await store.get(dg(data)) == data
    assert_consistent(store)


async def test_chunk_file_of_other_size_is_not_served(store: ChunkStore) -> None:
    data = blob(5, 4000)
    assert await store.put(dg(data), data)
    # Replaced behind our back by longer, different content: the recorded size differs.
    store.path_for(dg(data)).write_bytes(blob(6, 5000))
    assert await store.get(dg(data)) is None
    assert store.stats()["corrupt"] == 1
    assert await store.put(dg(data), data) is True
    assert await store.get(dg(data)) == data
    assert_consistent(store)


async def test_deleted_chunk_file_is_a_miss(store: ChunkStore) -> None:
    data = blob(6)
    assert await store.put(dg(data), data)
    store.path_for(dg(data)).unlink()
    assert await store.get(dg(data)) is None
    assert not store.has(dg(data))
    assert_consistent(store)


async def test_flipped_byte_detected_with_verify_reads(tmp_path: Path) -> None:
    s = ChunkStore(tmp_path / "store", 1 << 20, verify_reads=True)
    await s.open()
    data = blob(8, 2000)
    assert await s.put(dg(data), data)
    path = s.path_for(dg(data))
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    assert await s.get(dg(data)) is None
    assert not path.exists() or not s.has(dg(data))
    assert s.stats()["corrupt"] == 1
    await s.close()
    assert not path.exists()


async def test_unclean_shutdown_across_reboot_rehashes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = ChunkStore(root, 1 << 20)
    await s.open()
    good, torn = blob(1, 3000), blob(2, 3000)
    assert await s.put(dg(good), good)
    assert await s.put(dg(torn), torn)
    await s.close()
    # As if the machine crashed while the store was open in an earlier boot: pages of a
    # renamed file never reached the disk (same size, wrong content).
    (root / "store-state").write_text("open 00000000-0000-0000-0000-000000000000\n")
    s.path_for(dg(torn)).write_bytes(bytes(3000))

    s2 = ChunkStore(root, 1 << 20)
    await s2.open()
    assert s2.stats()["unverified"] == 2
    assert await s2.get(dg(torn)) is None
    assert await s2.get(dg(good)) == good
    assert s2.stats()["unverified"] == 0
    assert s2.stats()["corrupt"] == 1
    await s2.close()
    assert not s2.path_for(dg(torn)).exists()


_CRASHER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from alsd.storage.chunkstore import ChunkStore

    async def main() -> None:
        store = ChunkStore(Path(sys.argv[1]), 1 << 20)
        await store.open()
        data = bytes.fromhex(sys.argv[2])
        assert await store.put(sys.argv[3], data)
        print("ready", flush=True)
        sys.stdin.readline()  # wait to be killed, store still open

    asyncio.run(main())
    """
)


def test_process_killed_same_boot_is_trusted_and_unlocked(tmp_path: Path) -> None:
    root = tmp_path / "store"
    data = blob(1, 5000)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(root), data.hex(), dg(data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        # While the other process has it open, the store cannot be opened here.
        with pytest.raises(StoreError, match="in use"):
            asyncio.run(ChunkStore(root, 1 << 20).open())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (root / "store-state").read_text().startswith("open ")

    async def reopen() -> None:
        s2 = ChunkStore(root, 1 << 20)
        await s2.open()  # the kernel released the dead process's lock
        # Same boot: the page cache kept everything the killed process wrote.
        assert s2.stats()["unverified"] == 0
        assert await s2.get(dg(data)) == data
        assert_consistent(s2)
        await s2.close()

    asyncio.run(reopen())


async def test_store_is_locked_while_open(tmp_path: Path) -> None:
    s = ChunkStore(tmp_path / "store", 1000)
    await s.open()
    with pytest.raises(StoreError, match="in use"):
        await ChunkStore(tmp_path / "store", 1000).open()
    await s.close()
    s2 = ChunkStore(tmp_path / "store", 1000)
    await s2.open()
    await s2.close()


async def test_reopen_with_lower_limit_evicts_oldest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = ChunkStore(root, 1 << 20)
    await s.open()
    chunks = [blob(i) for i in range(4)]
    for x in chunks:
        assert await s.put(dg(x), x)
    await s.close()
    # mtime is the LRU order after a restart; make it explicit: chunk i used at time i.
    for i, x in enumerate(chunks):
        os.utime(s.path_for(dg(x)), ns=(1_000_000_000 * (i + 1),) * 2)

    s2 = ChunkStore(root, 2500)
    await s2.open()
    assert [s2.has(dg(x)) for x in chunks] == [False, False, True, True]
    assert s2.stats()["evictions"] == 2
    assert_consistent(s2)
    # The LRU order survived the restart: the next eviction takes chunk 2, not 3.
    extra = blob(10)
    assert await s2.put(dg(extra), extra)
    assert [s2.has(dg(x)) for x in chunks] == [False, False, False, True]
    await s2.close()


async def test_cancelled_put_still_accounts_its_file(store: ChunkStore) -> None:
    data = blob(11, 3000)
    task = asyncio.create_task(store.put(dg(data), data))
    # One loop turn: put() has hashed (inline), reserved room and started its commit.
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()  # waits for the commit, which accounts the file it wrote
    assert store.has(dg(data))
    assert store.path_for(dg(data)).read_bytes() == data
    assert_consistent(store)


async def test_concurrent_mixed_operations_keep_accounting_exact(tmp_path: Path) -> None:
    rng = random.Random(1234)
    s = ChunkStore(tmp_path / "store", 20_000)
    await s.open()
    pool = [blob(i, rng.choice((500, 1500, 3000, 7000))) for i in range(40)]

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(60):
            data = r.choice(pool)
            if r.random() < 0.5:
                await s.put(dg(data), data)
            else:
                got = await s.get(dg(data))
                assert got is None or got == data

    await asyncio.gather(*(worker(i) for i in range(8)))
    assert_consistent(s)
    assert s.stats()["bytes"] <= 20_000
    assert s.stats()["evictions"] > 0
    await s.close()


async def test_not_open_raises(tmp_path: Path) -> None:
    s = ChunkStore(tmp_path / "store", 100)
    with pytest.raises(StoreError):
        await s.put(dg(b"x"), b"x")


# ---------------------------------------------------------------------- real full disk


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, so writes fail with a genuine ENOSPC."""
    with small_tmpfs(tmp_path / "small", "1m") as mnt:
        yield mnt


async def test_full_disk_put_returns_false_and_store_stays_consistent(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alsd.storage.chunkstore")
    # The byte limit is far above the filesystem size: the disk fills first.
    s = ChunkStore(small_fs / "store", 64 << 20)
    await s.open()
    try:
        stored: list[bytes] = []
        failed: list[bytes] = []
        for i in range(40):  # 40 x 100 KiB > 1 MiB
            data = blob(i, 100 * 1024)
            if await s.put(dg(data), data):
                assert not failed, "a put succeeded after the disk was full"
                stored.append(data)
            else:
                failed.append(data)
        assert stored and len(failed) >= 2
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert s.stats()["put_failures"] == len(failed)
        for data in failed:
            assert not s.has(dg(data))
            assert not s.path_for(dg(data)).exists()
        for data in stored:
            assert await s.get(dg(data)) == data
        assert_consistent(s)

        # Room appears (the filesystem grows): storing works again, with one info line.
        r = run("mount", "-o", "remount,size=8m", str(small_fs))
        assert r.returncode == 0, r.stderr
        assert await s.put(dg(failed[0]), failed[0]) is True
        assert await s.get(dg(failed[0])) == failed[0]
        assert any("storing chunks again" in r.getMessage() for r in caplog.records)

        # A read-only filesystem (EROFS) is handled the same way.
        r = run("mount", "-o", "remount,ro", str(small_fs))
        assert r.returncode == 0, r.stderr
        assert await s.put(dg(failed[1]), failed[1]) is False
        assert await s.get(dg(stored[0])) == stored[0]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert_consistent(s)
        r = run("mount", "-o", "remount,rw", str(small_fs))
        assert r.returncode == 0, r.stderr
    finally:
        await s.close()


# ---------------------------------------------------------------- ranged reads


async def test_get_range_returns_exact_slices(store: ChunkStore) -> None:
    data = bytes(random.Random(3).randbytes(9000))
    assert await store.put(dg(data), data)
    d = dg(data)
    for start, end in [(0, 9000), (0, 1), (8999, 9000), (4095, 4097), (100, 100), (0, 0)]:
        assert await store.get_range(d, start, end) == data[start:end], (start, end)
    # Clamped to the chunk, like a slice.
    assert await store.get_range(d, 8000, 20_000) == data[8000:]
    assert await store.get_range(d, 9000, 9100) == b""
    assert await store.get_range(dg(b"absent"), 0, 10) is None
    assert_consistent(store)


async def test_cached_slices_are_read_without_a_thread_and_others_with_one(
    tmp_path: Path,
) -> None:
    store = ChunkStore(tmp_path / "store", 1 << 20)
    await store.open()
    data = bytes(random.Random(4).randbytes(300_000))
    d = dg(data)
    assert await store.put(d, data)
    # Just written: the page cache holds the file, the read is served on the loop thread.
    assert await store.get_range(d, 1000, 200_000) == data[1000:200_000]
    assert store.stats()["cached_reads"] == 1
    _evict_from_page_cache(store.path_for(d))
    if _in_page_cache(store.path_for(d)):
        pytest.skip("this filesystem keeps the chunk file cached (no eviction to test)")
    # Not cached: a worker thread reads it from the disk; the bytes are the same.
    assert await store.get_range(d, 5, 299_999) == data[5:299_999]
    assert store.stats()["cached_reads"] == 1
    assert await store.get_range(d, 5, 299_999) == data[5:299_999]  # cached again now
    assert store.stats()["cached_reads"] == 2
    # A file of the wrong size is never served from the page cache either.
    os.truncate(store.path_for(d), len(data) + 1)
    assert await store.get_range(d, 0, 10) is None
    assert store.stats()["corrupt"] == 1 and not store.has(d)
    await store.close()


async def test_get_range_of_damaged_file_is_a_miss(store: ChunkStore) -> None:
    data = blob(11, 4000)
    assert await store.put(dg(data), data)
    os.truncate(store.path_for(dg(data)), 1000)
    # Even a slice inside the surviving part is refused: the file is not what was stored.
    assert await store.get_range(dg(data), 0, 500) is None
    assert not store.has(dg(data))
    assert store.stats()["corrupt"] == 1
    assert await store.put(dg(data), data) is True
    assert await store.get_range(dg(data), 3000, 4000) == data[3000:4000]
    assert_consistent(store)


async def test_get_range_verifies_when_asked(tmp_path: Path) -> None:
    s = ChunkStore(tmp_path / "store", 1 << 20, verify_reads=True)
    await s.open()
    data = blob(12, 2000)
    assert await s.put(dg(data), data)
    path = s.path_for(dg(data))
    raw = bytearray(path.read_bytes())
    raw[1500] ^= 1  # outside the slice asked for: still the whole chunk is checked
    path.write_bytes(bytes(raw))
    assert await s.get_range(dg(data), 0, 100) is None
    assert s.stats()["corrupt"] == 1
    await s.close()


async def test_get_range_rehashes_after_unclean_reboot(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = ChunkStore(root, 1 << 20)
    await s.open()
    good, torn = blob(13, 3000), blob(14, 3000)
    assert await s.put(dg(good), good)
    assert await s.put(dg(torn), torn)
    await s.close()
    (root / "store-state").write_text("open 00000000-0000-0000-0000-000000000000\n")
    s.path_for(dg(torn)).write_bytes(bytes(3000))
    s2 = ChunkStore(root, 1 << 20)
    await s2.open()
    assert await s2.get_range(dg(torn), 10, 20) is None
    assert await s2.get_range(dg(good), 10, 20) == good[10:20]
    assert s2.stats()["unverified"] == 0
    await s2.close()
