"""``alsd inspect FILE``: output fields and exit codes on real fixture blobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alsd.tools import inspect
from tests.support.oci_layout import OciLayout


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = inspect.main("inspect", list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def layout(fixtures: Path) -> OciLayout:
    return OciLayout(fixtures / "images")


def test_estargz_with_annotations(layout: OciLayout, capsys: pytest.CaptureFixture[str]) -> None:
    layer = layout.image("esgz").layers[0]
    path = str(layout.blob_path(layer.digest))
    rc, out, err = run(capsys, path, "--annotations", json.dumps(layer.annotations))
    assert rc == 0, err
    result = json.loads(out)
    assert result["format"] == "estargz"
    assert result["verified"] is True
    assert result["toc_digest"] == layer.annotations["containerd.io/snapshot/stargz/toc.digest"]
    assert result["prefetch"] == "landmark"
    assert 0 < result["prioritized_bytes"] < layer.size
    assert result["regular_files"] == 10
    assert result["chunks"] > result["regular_files"]
    assert result["entries"] >= result["regular_files"]


def test_every_lazy_tag(layout: OciLayout, capsys: pytest.CaptureFixture[str]) -> None:
    for tag in ("esgz-noopt", "zstdchunked-podman43", "zstdchunked-podman54", "zstdchunked-stargz"):
        layer = layout.image(tag).layers[0]
        rc, out, err = run(capsys, str(layout.blob_path(layer.digest)))
        assert rc == 0, err
        result = json.loads(out)
        assert result["format"] == ("estargz" if tag == "esgz-noopt" else "zstd:chunked")
        assert result["verified"] is False  # no annotations given


def test_plain_gzip_layer_is_readable_but_not_lazy(
    layout: OciLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    layer = layout.image("gzip").layers[0]
    rc, out, err = run(capsys, str(layout.blob_path(layer.digest)))
    assert rc == 0, err
    result = json.loads(out)
    assert result["format"] is None and result["verified"] is False


def test_plain_zstd_and_tar_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import tarfile

    import zstandard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("hello")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    for name, data in (
        ("layer.tar", buf.getvalue()),
        ("layer.tar.zst", zstandard.ZstdCompressor().compress(buf.getvalue())),
    ):
        p = tmp_path / name
        p.write_bytes(data)
        rc, out, err = run(capsys, str(p))
        assert rc == 0, err
        assert json.loads(out)["format"] is None


def test_corrupt_layers_exit_1(
    layout: OciLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gz = layout.blob(layout.image("gzip").layers[0].digest)
    esgz = layout.image("esgz").layers[0]
    cases = {
        "truncated-gzip": gz[: len(gz) // 2],
        "garbage": b"not a layer at all" * 100,
        "cut-estargz-footer": layout.blob(esgz.digest)[:-10],
        "corrupt-payload": _flip(layout.blob(esgz.digest), 600),
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        rc, out, err = run(capsys, str(p))
        assert rc == 1, name
        assert out == ""
        assert err.count("\n") == 1 and str(p) in err
    # A TOC digest that does not match the given annotation is corrupt too.
    bad = {"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "1" * 64}
    rc, out, err = run(capsys, str(layout.blob_path(esgz.digest)), "--annotations", json.dumps(bad))
    assert rc == 1 and "TOC digest mismatch" in err and err.count("\n") == 1


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    rc, _, err = run(capsys, str(p), "--annotations", "{not json")
    assert rc == 2 and "not JSON" in err
    rc, _, err = run(capsys, str(p), "--annotations", "[1]")
    assert rc == 2


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)
