"""``alsd status`` as text: every line in words an admin understands (alsd(8) explains
them), per image its reference, per layer how much is local; a bar only on a terminal.
The daemon's real document is checked in tests/integration/test_daemon_fs.py."""

from __future__ import annotations

from typing import Any

from alsd.tools.status import format_status

MiB = 1 << 20


def layer(ref: str, digest: str, no: int, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ref": ref, "digest": digest, "format": "estargz", "layer_no": no, "use_count": 1,
        "content_bytes": 64 * MiB, "local_bytes": 16 * MiB, "bytes_fetched": 12 * MiB,
        "bytes_served": 3 * MiB, "prefetch": "done", "materialized": "no",
    }  # fmt: skip
    return base | kw


def document(layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pid": 4321, "uptime_s": 312.5, "mountpoint": "/var/lib/alsd/store",
        "chunk_store": {"bytes": 16 * MiB, "max_bytes": 10 << 30, "count": 40, "hits": 17,
                        "misses": 0},
        "engine": {"reads": 170, "reads_fetched": 17},
        "registry": {"bytes": 12_268_339, "requests": 23},
        "fuse": {"uses": 2, "releases": 1},
        "layers": layers,
    }  # fmt: skip


def test_the_summary_lines_say_what_they_count() -> None:
    text = format_status(document([layer("r.example/a:1", "sha256:" + "a" * 64, 0)]))
    lines = text.splitlines()
    assert lines[0] == "alsd        pid 4321, up 5m 12s, serving /var/lib/alsd/store"
    assert lines[1] == "cache       16.0 MiB of 10.0 GiB used, in 40 chunks"
    assert lines[2] == (
        "reads       170 file reads answered: 153 from the local cache, 17 had to fetch "
        "from the registry first"
    )
    # 12 268 339 bytes is 11.7 MiB, as the demo's summary prints it.
    assert lines[3].startswith("fetched     11.7 MiB from registries in 23 requests")
    assert lines[4] == (
        "podman      took layers into use twice and released them once; "
        "1 of 1 layers in use now"
    )
    assert "hits" not in text and "use/release" not in text


def test_layers_are_grouped_by_image_with_how_much_is_local() -> None:
    doc = document([
        layer("r.example/b:2", "sha256:" + "b" * 64, 1, prefetch="disabled by landmark",
              local_bytes=64 * MiB, use_count=0, materialized="yes"),
        layer("r.example/b:2", "sha256:" + "c" * 64, 0, prefetch="no landmark"),
        layer("r.example/a:1", "sha256:" + "a" * 64, 0, prefetch="disabled", local_bytes=0),
    ])  # fmt: skip
    lines = format_status(doc).splitlines()
    a, b = lines.index("IMAGE r.example/a:1"), lines.index("IMAGE r.example/b:2")
    assert a < b  # images sorted by reference
    assert lines[a + 1].split() == [
        "LAYER", "FORMAT", "USERS", "LOCAL", "FETCHED", "READ", "PRIORITISED", "MATERIALIZED"
    ]  # fmt: skip
    assert lines[a + 2].split() == [
        "sha256:aaaaaaaaaaaa", "estargz", "1", "0%", "of", "64.0", "MiB", "12.0", "MiB",
        "3.0", "MiB", "off", "no",
    ]  # fmt: skip
    # Layers in their order in the image; the landmark states in words.
    assert lines[b + 2].startswith("  sha256:cccccccccccc")
    assert lines[b + 2].endswith("none in image  no") and " 25% of 64.0 MiB" in lines[b + 2]
    assert lines[b + 3].endswith("none in image  yes") and "100% of 64.0 MiB" in lines[b + 3]
    assert "disabled by landmark" not in "\n".join(lines)


def test_a_bar_only_when_asked() -> None:
    doc = document([layer("r.example/a:1", "sha256:" + "a" * 64, 0)])
    assert "[" not in format_status(doc)
    bar = format_status(doc, bar=True)
    assert "[#####---------------]  25% of 64.0 MiB" in bar


def test_nothing_served_yet() -> None:
    text = format_status(document([]))
    assert "layers      none yet" in text and "IMAGE" not in text
