"""``alsd inspect FILE``: output (JSON and text), exit statuses and the messages of each
mistake, on real fixture blobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alsd.tools import inspect
from tests.support.oci_layout import OciLayout


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``alsd inspect --json ARGV``."""
    return run_text(capsys, "--json", *argv)


def run_text(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
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


def test_plain_gzip_layer_is_not_lazy_and_says_why(
    layout: OciLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    layer = layout.image("gzip").layers[0]
    path = str(layout.blob_path(layer.digest))
    rc, out, err = run(capsys, path)
    assert rc == 1
    result = json.loads(out)  # --json still describes it, for scripts
    assert result["lazy"] is False and "plain gzip layer" in result["reason"]
    assert result["format"] is None and result["verified"] is False
    # Text: nothing on stdout, one line on stderr naming the file, the reason and the fix.
    rc, out, err = run_text(capsys, path)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1
    for words in (path, "not lazily pullable", "plain gzip", "no table of contents",
                  "podman pulls it whole", "alsd convert"):  # fmt: skip
        assert words in err, words


def test_text_output_of_a_lazy_blob(layout: OciLayout, capsys: pytest.CaptureFixture[str]) -> None:
    layer = layout.image("esgz").layers[0]
    path = str(layout.blob_path(layer.digest))
    rc, out, err = run_text(capsys, path, "--annotations", json.dumps(layer.annotations))
    assert rc == 0 and err == ""
    assert out.startswith(f"{path}: lazily pullable, estargz\n")
    assert "verified against the annotation" in out
    assert "10 regular files" in out and "before the landmark" in out
    rc, out, _ = run_text(capsys, path)
    assert rc == 0 and "not verified: give --annotations" in out


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
        assert rc == 1
        result = json.loads(out)
        assert result["format"] is None and result["lazy"] is False
        kind = "zstd" if name.endswith(".zst") else "uncompressed tar"
        assert f"a plain {kind} layer" in result["reason"] and f"a plain {kind} layer" in err


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
    assert rc == 2 and "object of strings" in err
    rc, _, err = run(capsys, str(p), "--max-toc-bytes", "0")
    assert rc == 2 and "--max-toc-bytes" in err


@pytest.mark.parametrize("arg", ["/nonexistent.blob", "./layer.tar.gz", "../x", "~/blob"])
def test_a_missing_file_is_no_such_file(capsys: pytest.CaptureFixture[str], arg: str) -> None:
    rc, out, err = run_text(capsys, arg)
    assert rc == 2 and out == ""
    assert f"alsd inspect: {arg}: no such file" in err
    assert "InvalidReference" not in err and "image reference such as" in err


def test_neither_a_file_nor_a_reference(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_text(capsys, "Not/A:Reference:x")
    assert rc == 2
    assert "no such file, and not an image reference" in err and "Not/A:Reference:x" in err


def test_a_directory_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run_text(capsys, str(tmp_path))
    assert rc == 2 and "is a directory; give a layer blob file" in err


@pytest.mark.parametrize("flag", ["--annotations", "--media-type"])
def test_blob_options_with_a_reference_say_why(
    capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    value = "{}" if flag == "--annotations" else "application/vnd.oci.image.layer.v1.tar+gzip"
    rc, out, err = run_text(capsys, "registry.example/app:1.0", flag, value)
    assert rc == 2 and out == ""
    assert f"{flag} applies to a blob FILE only" in err and "manifest" in err


def test_configuration_errors_exit_2(
    layout: OciLayout, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blob = str(layout.blob_path(layout.image("esgz").layers[0].digest))
    missing = tmp_path / "missing.toml"
    bad = tmp_path / "bad.toml"
    bad.write_text("[registry]\nauth_file = 5\n")
    for target in (blob, "registry.example/app:1.0"):  # both forms, before any network
        rc, out, err = run_text(capsys, target, "--config", str(missing))
        assert rc == 2 and out == "" and f"{missing}: no such file" in err
        rc, out, err = run_text(capsys, target, "--config", str(bad))
        assert rc == 2 and out == "" and str(bad) in err and "'registry.auth_file'" in err


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)
