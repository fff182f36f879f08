"""metadata: envelope round trips, refusal of anything inexact, atomic saves on real files."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from alsd.errors import StoreError
from alsd.storage.metadata import (
    MAGIC,
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    MetadataError,
    MetadataStore,
    atomic_write,
    pack,
    unpack,
)
from tests.support.tmpfs import small_tmpfs

REPO = Path(__file__).resolve().parents[3]

SAMPLE: dict[str, Any] = {
    "ref": "registry.example:5000/library/alpine:3.19",
    "manifest": b'{"schemaVersion":2}',
    "sizes": [0, 1, 2**40, -5],
    "nested": {"a": [b"\x00\xff", "\u00e9", None, True, 1.5]},
    "empty": b"",
}


def envelope(payload: bytes, version: int = SCHEMA_VERSION) -> bytes:
    """A well-formed envelope around arbitrary payload bytes (valid checksum)."""
    head = struct.pack(">8sH", MAGIC, version)
    return head + payload + hashlib.sha256(head + payload).digest()


# ---------------------------------------------------------------------- pack / unpack


def test_round_trip_keeps_bytes_and_str_apart() -> None:
    out = unpack(pack(SAMPLE))
    assert out == SAMPLE
    assert isinstance(out["manifest"], bytes)
    assert isinstance(out["ref"], str)
    assert unpack(pack((1, (2, 3)))) == [1, [2, 3]]  # tuples come back as lists


def test_metadata_error_is_a_store_error() -> None:
    assert issubclass(MetadataError, StoreError)


@pytest.mark.parametrize("obj", [{1: "int key"}, {"s": {1, 2}}, object(), {"x": 2**70}])
def test_pack_refuses_what_cannot_be_loaded_back(obj: Any) -> None:
    with pytest.raises(MetadataError):
        pack(obj)


def test_every_single_byte_flip_is_detected() -> None:
    data = pack({"k": b"value", "n": [1, 2, 3]})
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(MetadataError):
            unpack(bytes(bad))


def test_every_truncation_is_detected() -> None:
    data = pack(SAMPLE)
    for n in range(len(data)):
        with pytest.raises(MetadataError):
            unpack(data[:n])


def test_newer_version_is_refused() -> None:
    with pytest.raises(MetadataError, match="newer"):
        unpack(pack({"a": 1}, version=SCHEMA_VERSION + 1))


def test_older_version_is_migrated_or_refused() -> None:
    old = pack({"name": "x"}, version=1)

    def v1_to_v2(obj: Any) -> Any:
        return {"name": obj["name"], "added": 0}

    assert unpack(old, version=2, migrations={1: v1_to_v2}) == {"name": "x", "added": 0}
    with pytest.raises(MetadataError, match="no migration"):
        unpack(old, version=2, migrations={})
    with pytest.raises(MetadataError, match="migration"):
        unpack(pack(["not a dict"], version=1), version=2, migrations={1: v1_to_v2})


def test_trailing_bytes_in_payload_are_refused() -> None:
    payload = pack({"a": 1})[10:-32]
    with pytest.raises(MetadataError, match="after the payload"):
        unpack(envelope(payload + b"\xc0"))


def test_unpacking_is_bounded() -> None:
    # A valid checksum around a payload that announces a 4-billion-element array: it must
    # fail as malformed, not try to allocate it.
    with pytest.raises(MetadataError):
        unpack(envelope(b"\xdd\xff\xff\xff\xff"))
    with pytest.raises(MetadataError):
        unpack(envelope(b"\xc6\x7f\xff\xff\xff" + b"x" * 10))  # bin32 longer than the data
    assert MAX_PAYLOAD_BYTES >= 64 << 20


def test_ext_and_non_str_keys_in_files_are_refused() -> None:
    with pytest.raises(MetadataError):
        unpack(envelope(b"\x81\x01\x02"))  # {1: 2}: strict_map_key


# ---------------------------------------------------------------------- MetadataStore


def test_store_save_load_iter_delete(tmp_path: Path) -> None:
    ms = MetadataStore(tmp_path / "meta")
    keys = ["docker.io/library/alpine:latest", "sha256:" + "a" * 64, "", "../../etc/passwd", "é/☃"]
    for i, key in enumerate(keys):
        ms.save("layer", key, {"i": i, "key": key})
    ms.save("image", keys[0], b"image body")
    for i, key in enumerate(keys):
        assert ms.load("layer", key) == {"i": i, "key": key}
    assert ms.load("layer", "never saved") is None
    assert ms.load("image", keys[0]) == b"image body"
    assert sorted(k for k, _ in ms.iter("layer")) == sorted(keys)
    assert dict(ms.iter("image")) == {keys[0]: b"image body"}
    # Every file lives directly in its kind directory, whatever the key looks like.
    assert {p.parent for p in (tmp_path / "meta").rglob("*.meta")} == {
        tmp_path / "meta" / "layer",
        tmp_path / "meta" / "image",
    }
    ms.save("layer", keys[0], "replaced")
    assert ms.load("layer", keys[0]) == "replaced"
    assert ms.delete("layer", keys[0]) is True
    assert ms.delete("layer", keys[0]) is False
    assert ms.load("layer", keys[0]) is None
    assert list(ms.iter("nothing-here")) == []
    with pytest.raises(ValueError):
        ms.save("../x", "k", 1)


async def test_async_wrappers(tmp_path: Path) -> None:
    ms = MetadataStore(tmp_path / "meta")
    await ms.save_async("image", "ref", SAMPLE)
    assert await ms.load_async("image", "ref") == SAMPLE
    assert await ms.list_async("image") == [("ref", SAMPLE)]
    assert await ms.delete_async("image", "ref") is True
    assert await ms.load_async("image", "ref") is None
    assert await ms.sweep_async() == 0


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_payload(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[12] ^= 1
    return bytes(bad)


def _bad_checksum(data: bytes) -> bytes:
    return data[:-32] + bytes(32)


def _newer(data: bytes) -> bytes:
    return pack({"kind": "layer", "key": "k", "obj": 1}, version=SCHEMA_VERSION + 1)


def _garbage(data: bytes) -> bytes:
    return b"not a metadata file at all, just some text\n"


def _empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize(
    "damage", [_truncate, _flip_payload, _bad_checksum, _newer, _garbage, _empty]
)
def test_bad_file_is_discarded_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    ms = MetadataStore(tmp_path / "meta")
    ms.save("layer", "k", {"big": b"x" * 1000})
    ms.save("layer", "other", 2)
    path = ms.path_for("layer", "k")
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="alsd.storage.metadata"):
        assert ms.load("layer", "k") is None
    assert any("discarded" in r.getMessage() for r in caplog.records)
    assert not path.exists()
    assert ms.load("layer", "other") == 2


def test_iter_discards_bad_files_and_ignores_tmp(tmp_path: Path) -> None:
    ms = MetadataStore(tmp_path / "meta")
    ms.save("layer", "good", 1)
    ms.save("layer", "bad", 2)
    bad = ms.path_for("layer", "bad")
    bad.write_bytes(_truncate(bad.read_bytes()))
    tmp = bad.parent / ".tmp.leftover.abc"
    tmp.write_bytes(pack({"kind": "layer", "key": "ghost", "obj": 3}))
    assert list(ms.iter("layer")) == [("good", 1)]
    assert not bad.exists()
    assert ms.sweep() == 1
    assert not tmp.exists()


def test_file_under_another_name_is_not_trusted(tmp_path: Path) -> None:
    ms = MetadataStore(tmp_path / "meta")
    ms.save("layer", "a", "content of a")
    ms.save("layer", "b", "content of b")
    # A file copied under b's name still says it is a's record.
    ms.path_for("layer", "b").write_bytes(ms.path_for("layer", "a").read_bytes())
    assert ms.load("layer", "b") is None
    assert ms.load("layer", "a") == "content of a"
    # And a record of another kind is not accepted either.
    (tmp_path / "meta" / "image").mkdir()
    ms.path_for("image", "a").write_bytes(ms.path_for("layer", "a").read_bytes())
    assert ms.load("image", "a") is None


def test_newer_store_version_is_discarded_by_older_reader(tmp_path: Path) -> None:
    MetadataStore(tmp_path, schema_version=SCHEMA_VERSION + 1).save("image", "r", "future")
    assert MetadataStore(tmp_path).load("image", "r") is None
    assert not MetadataStore(tmp_path).path_for("image", "r").exists()


def test_older_store_version_is_migrated(tmp_path: Path) -> None:
    MetadataStore(tmp_path, schema_version=1).save("image", "r", {"n": 1})

    def v1_to_v2(record: Any) -> Any:
        record["obj"]["n"] += 1
        return record

    new = MetadataStore(tmp_path, schema_version=2, migrations={1: v1_to_v2})
    assert new.load("image", "r") == {"n": 2}
    assert MetadataStore(tmp_path, schema_version=2).load("image", "r") is None


# ---------------------------------------------------------------------- atomic saves

_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from alsd.storage import metadata

    def paused_replace(src, dst):
        # Stop just before the rename, the moment a crash hurts most; the parent kills us.
        print("ready", src, flush=True)
        sys.stdin.readline()
        raise SystemExit("parent did not kill the writer")

    os.replace = paused_replace
    store = metadata.MetadataStore(Path(sys.argv[1]))
    store.save("image", "ref", {"v": "new", "pad": b"x" * 100000})
    """
)


def test_writer_killed_before_rename_leaves_old_file_intact(tmp_path: Path) -> None:
    root = tmp_path / "meta"
    ms = MetadataStore(root)
    ms.save("image", "ref", {"v": "old"})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # A real writer process, killed with SIGKILL; os.replace is patched in the child only
    # to stop it at an exact point, not to fake the failure.
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], line
        tmp = Path(line[1])
        assert tmp.exists() and tmp.parent == ms.path_for("image", "ref").parent
        assert tmp.name.startswith(".tmp.")
        # The new content is complete in the tmp file, yet readers see only the old one.
        assert unpack(tmp.read_bytes())["obj"]["v"] == "new"
        assert ms.load("image", "ref") == {"v": "old"}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ms.load("image", "ref") == {"v": "old"}
    assert list(ms.iter("image")) == [("ref", {"v": "old"})]
    assert ms.sweep() == 1
    assert not tmp.exists()


def test_concurrent_saves_of_one_key_never_mix(tmp_path: Path) -> None:
    ms = MetadataStore(tmp_path / "meta")
    values = [{"writer": i, "pad": bytes([i]) * 50_000} for i in range(6)]

    def write(v: dict[str, Any]) -> None:
        for _ in range(10):
            ms.save("layer", "k", v)

    with ThreadPoolExecutor(len(values)) as ex:
        list(ex.map(write, values))
    assert ms.load("layer", "k") in values
    assert os.listdir(tmp_path / "meta" / "layer") == [ms.path_for("layer", "k").name]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, so a save fails with a genuine ENOSPC."""
    with small_tmpfs(tmp_path / "small", "256k") as mnt:
        yield mnt


def test_failed_save_on_full_disk_keeps_old_file(small_fs: Path) -> None:
    ms = MetadataStore(small_fs / "meta")
    ms.save("layer", "k", {"v": "old"})
    with pytest.raises(MetadataError):
        ms.save("layer", "k", {"v": "new", "pad": os.urandom(1 << 20)})
    assert ms.load("layer", "k") == {"v": "old"}
    assert [p.name for p in ms.path_for("layer", "k").parent.iterdir()] == [
        ms.path_for("layer", "k").name
    ]


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"first")
    atomic_write(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert os.listdir(tmp_path) == ["f"]
    with pytest.raises(MetadataError):
        atomic_write(tmp_path / "missing-dir" / "f", b"x")
