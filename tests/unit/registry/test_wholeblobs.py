"""alsd.registry.wholeblobs: bounded in bytes (least recently used out first) and in time."""

from __future__ import annotations

from alsd.registry.wholeblobs import WholeBlobs


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_keeps_and_returns_a_blob() -> None:
    w = WholeBlobs(100, 60.0)
    assert w.put("sha256:a", b"x" * 10)
    assert w.get("sha256:a") == b"x" * 10
    assert w.get("sha256:b") is None


def test_a_blob_larger_than_the_bound_is_not_kept() -> None:
    w = WholeBlobs(100, 60.0)
    assert not w.put("sha256:a", b"x" * 101)
    assert w.get("sha256:a") is None and w.bytes == 0


def test_least_recently_used_goes_first() -> None:
    w = WholeBlobs(100, 60.0)
    w.put("sha256:a", b"a" * 40)
    w.put("sha256:b", b"b" * 40)
    assert w.get("sha256:a")  # a is now the most recently used
    w.put("sha256:c", b"c" * 40)
    assert w.get("sha256:b") is None
    assert w.get("sha256:a") == b"a" * 40 and w.get("sha256:c") == b"c" * 40
    assert w.bytes == 80 and len(w) == 2


def test_expires_after_keep_s() -> None:
    clock = Clock()
    w = WholeBlobs(100, 60.0, clock)
    w.put("sha256:a", b"a" * 10)
    clock.t = 59.0
    assert w.get("sha256:a") == b"a" * 10
    clock.t = 61.0
    assert w.get("sha256:a") is None and w.bytes == 0


def test_put_again_replaces_without_double_counting() -> None:
    w = WholeBlobs(100, 60.0)
    w.put("sha256:a", b"a" * 60)
    w.put("sha256:a", b"a" * 60)
    assert w.bytes == 60 and len(w) == 1
