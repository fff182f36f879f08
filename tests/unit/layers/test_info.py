"""alsd.layers.info: the exact JSON podman decodes, both generations, the unknown-size switch."""

from __future__ import annotations

import json
import logging

import pytest

from alsd.errors import NotLazyError
from alsd.layers import info

BLOB = "sha256:" + "a" * 64
DIFF = "sha256:" + "b" * 64
TOC = "sha256:" + "c" * 64


def test_old_generation_fields_and_types() -> None:
    raw = info.info_old(
        blob_digest=BLOB, blob_size=1234, diff_id=DIFF, diff_size=5678, compression=2
    )
    assert json.loads(raw) == {
        "compressed-diff-digest": BLOB,
        "compressed-size": 1234,
        "diff-digest": DIFF,
        "diff-size": 5678,
        "compression": 2,
    }


def test_new_generation_fields_and_types() -> None:
    raw = info.info_new(
        toc_digest=TOC,
        blob_digest=BLOB,
        blob_size=1234,
        diff_id=DIFF,
        diff_size=99,
        compression=4,
    )
    assert json.loads(raw) == {
        "toc-digest": TOC,
        "flags": {"expected-layer-diffid": DIFF},
        "compressed-diff-digest": BLOB,
        "compressed-size": 1234,
        "diff-size": 99,
        "compression": 4,
    }
    unknown = info.info_new(
        toc_digest=TOC,
        blob_digest=BLOB,
        blob_size=1,
        diff_id=DIFF,
        diff_size=None,
        compression=2,
    )
    assert json.loads(unknown)["diff-size"] == -1


def test_compression_numbers() -> None:
    assert info.compression_for("estargz") == 2
    assert info.compression_for("stargz") == 2
    assert info.compression_for("zstd:chunked") == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"blob_digest": "sha256:xyz"},
        {"diff_id": ""},
        {"diff_id": "sha512:" + "b" * 128},
        {"blob_size": 0},
        {"diff_size": -1},
        {"compression": 0},
    ],
)
def test_old_generation_refuses_guesses(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "blob_digest": BLOB,
        "blob_size": 10,
        "diff_id": DIFF,
        "diff_size": 1,
        "compression": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        info.info_old(**args)  # type: ignore[arg-type]


def test_known_size_is_passed_through() -> None:
    assert info.old_diff_size(4096, "fallback", ref="r", blob_digest=BLOB) == 4096


def test_unknown_size_fallback_refuses_the_layer() -> None:
    with pytest.raises(NotLazyError, match="uncompressed size unknown"):
        info.old_diff_size(None, "fallback", ref="r", blob_digest=BLOB)


def test_unknown_size_lazy_zero_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    digest = "sha256:" + "d" * 64
    with caplog.at_level(logging.WARNING, logger="alsd.layers.info"):
        assert info.old_diff_size(None, "lazy-zero", ref="r", blob_digest=digest) == 0
        assert info.old_diff_size(None, "lazy-zero", ref="r", blob_digest=digest) == 0
    warnings = [r for r in caplog.records if "podman save" in r.getMessage()]
    assert len(warnings) == 1
