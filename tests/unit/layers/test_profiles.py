"""ProfileBook: recording bounded by files and time, merged across runs, persisted in the
real metadata store, and the entries a layer gets (own recording, registry, shared layer)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from alsd.errors import FormatError
from alsd.layers.profiles import PROFILE_KIND, ProfileBook
from alsd.oci.layer_index import LayerIndex
from alsd.oci.profile import LayerProfile, Profile, ProfileEntry
from alsd.storage.metadata import MetadataStore
from tests.unit.oci.test_profile import make_layer

IMG1, IMG2 = ("sha256:" + c * 64 for c in "12")
FOREIGN = "sha256:" + "f" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def layer() -> tuple[str, LayerIndex]:
    return make_layer({f"f{i}": f"data {i}".encode() * 100 for i in range(8)})


def n(idx: LayerIndex, path: str) -> int:
    node = idx.find(path)
    assert node is not None
    return node


def book(tmp_path: Path, clock: Clock, **kw: object) -> ProfileBook:
    return ProfileBook(MetadataStore(tmp_path / "meta"), clock=clock, window_s=10.0, **kw)  # type: ignore[arg-type]


async def test_records_first_reads_in_order_bounded(
    tmp_path: Path, layer: tuple[str, LayerIndex]
) -> None:
    digest, idx = layer
    clock = Clock()
    b = book(tmp_path, clock, max_files=3)
    b.note_read("r", IMG1, digest, idx, n(idx, "f2"), 100, 50)
    b.note_read("r", IMG1, digest, idx, n(idx, "f2"), 0, 4096)  # before the first: ignored
    b.note_read("r", IMG1, digest, idx, n(idx, "f0"), 0, 10)
    b.note_read("r", IMG1, digest, idx, n(idx, "f2"), 120, 100)  # extends f2 to 220
    b.note_read("r", IMG1, digest, idx, n(idx, "f2"), 110, 20)  # inside: no change
    clock.now += 9.9
    b.note_read("r", IMG1, digest, idx, n(idx, "f5"), 7, 1)
    b.note_read("r", IMG1, digest, idx, n(idx, "f6"), 0, 1)  # beyond max_files
    await b.flush()
    stored = b.stored(IMG1)
    assert stored == Profile(
        (LayerProfile(digest, (ProfileEntry("f2", 100, 120), ProfileEntry("f0", 0, 10),
                               ProfileEntry("f5", 7, 1))),)
    )  # fmt: skip
    await b.close()


async def test_window_closes(tmp_path: Path, layer: tuple[str, LayerIndex]) -> None:
    digest, idx = layer
    clock = Clock()
    b = book(tmp_path, clock)
    b.note_read("r", IMG1, digest, idx, n(idx, "f1"), 0, 1)
    clock.now += 10.5
    b.note_read("r", IMG1, digest, idx, n(idx, "f2"), 0, 1)  # after the window
    await b.close()
    stored = b.stored(IMG1)
    assert stored is not None and [e.path for e in stored.layers[0].entries] == ["f1"]


async def test_runs_merge_and_survive_restart(
    tmp_path: Path, layer: tuple[str, LayerIndex]
) -> None:
    digest, idx = layer
    clock = Clock()
    b = book(tmp_path, clock)
    b.note_read("r", IMG1, digest, idx, n(idx, "f3"), 0, 1)
    b.note_read("r", IMG1, digest, idx, n(idx, "f1"), 0, 1)
    await b.close()
    # A restart: the next run reads f1 again, then f4; the merge keeps first-seen order.
    b2 = book(tmp_path, clock)
    await b2.load()
    b2.note_read("r", IMG1, digest, idx, n(idx, "f1"), 0, 1)
    b2.note_read("r", IMG1, digest, idx, n(idx, "f4"), 0, 1)
    await b2.flush()
    b3 = book(tmp_path, clock)
    await b3.load()
    got = await b3.entries_for("r", IMG1, digest, idx)
    assert [e.path for e in got] == ["f3", "f1", "f4"]
    # Another image sharing the layer gets the same entries.
    assert [e.path for e in await b3.entries_for("r2", IMG2, digest, idx)] == ["f3", "f1", "f4"]
    # Nothing for a layer nobody recorded.
    assert await b3.entries_for("r", IMG1, FOREIGN, idx) == []
    await asyncio.gather(b.close(), b2.close(), b3.close())


async def test_record_off_and_use_off(tmp_path: Path, layer: tuple[str, LayerIndex]) -> None:
    digest, idx = layer
    clock = Clock()
    b = book(tmp_path, clock, record=False)
    b.note_read("r", IMG1, digest, idx, n(idx, "f1"), 0, 1)
    await b.close()
    assert b.stored(IMG1) is None
    on = book(tmp_path, clock)
    on.note_read("r", IMG1, digest, idx, n(idx, "f1"), 0, 1)
    await on.close()
    off = book(tmp_path, clock, use=False)
    await off.load()
    assert await off.entries_for("r", IMG1, digest, idx) == []


async def test_corrupt_stored_profile_is_discarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MetadataStore(tmp_path / "meta")
    store.save(PROFILE_KIND, IMG1, {"v": 1, "ref": "r", "doc": b'{"mediaType": "x"}'})
    b = ProfileBook(store)
    with caplog.at_level(logging.WARNING):
        await b.load()
    assert b.stored(IMG1) is None
    assert "discarding stored profile" in caplog.text
    assert store.load(PROFILE_KIND, IMG1) is None


async def test_registry_profile_checked_and_negative_cached(
    tmp_path: Path, layer: tuple[str, LayerIndex], caplog: pytest.LogCaptureFixture
) -> None:
    digest, idx = layer
    clock = Clock()
    calls: list[str] = []
    answer: Profile | None = Profile(
        (
            LayerProfile(digest, (ProfileEntry("f7", 0, 5), ProfileEntry("nope", 0, 1),
                                  ProfileEntry("nope2", 0, 1))),
            LayerProfile(FOREIGN, (ProfileEntry("f1", 0, 1),)),
        )
    )  # fmt: skip

    async def lookup(ref: str, image: str) -> Profile | None:
        calls.append(image)
        return answer

    b = book(tmp_path, clock, lookup=lookup, negative_ttl_s=60.0)
    b.start_lookup("r", IMG1, [digest])
    with caplog.at_level(logging.WARNING):
        got = await b.entries_for("r", IMG1, digest, idx)
        got_again = await b.entries_for("r", IMG1, digest, idx)
    assert [e.path for e in got] == ["f7"] == [e.path for e in got_again]
    # One line per problem: the foreign layer, the names missing from the TOC; not repeated.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert FOREIGN in lines[0] and "not a layer of this image" in lines[0]
    assert "2 entries name no regular file" in lines[1]
    # An answer (also "none") is reused until negative_ttl_s passes.
    answer = None
    b.start_lookup("r", IMG1, [digest])
    assert calls == [IMG1]
    clock.now += 61
    b.start_lookup("r", IMG1, [digest])
    assert await b.entries_for("r", IMG1, digest, idx) == []
    assert calls == [IMG1, IMG1]
    await b.close()


async def test_failed_lookup_is_one_line_and_prefetches_nothing(
    tmp_path: Path, layer: tuple[str, LayerIndex], caplog: pytest.LogCaptureFixture
) -> None:
    digest, idx = layer

    async def lookup(ref: str, image: str) -> Profile | None:
        raise FormatError("profile: unknown field(s) ['files']")

    b = book(tmp_path, Clock(), lookup=lookup)
    b.start_lookup("r", IMG1, [digest])
    with caplog.at_level(logging.WARNING):
        assert await b.entries_for("r", IMG1, digest, idx) == []
        assert await b.entries_for("r", IMG1, digest, idx) == []
    assert [r.getMessage() for r in caplog.records] == [
        "r: registry prefetch profile ignored: profile: unknown field(s) ['files']"
    ]
    assert b.stats.lookup_errors == 1
    await b.close()
