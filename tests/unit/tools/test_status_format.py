"""``alsd status`` as text: the per-layer table shows how much is local and whether the
layer is materialised."""

from __future__ import annotations

from alsd.tools.status import format_status


def test_layer_table_shows_local_bytes_and_materialisation() -> None:
    doc = {
        "mountpoint": "/var/lib/alsd/store",
        "uptime_s": 5,
        "pid": 1,
        "layers": [
            {"ref": "r/a:1", "digest": "sha256:" + "a" * 64, "format": "estargz",
             "use_count": 1, "bytes_fetched": 10, "bytes_served": 20, "prefetch": "done",
             "local_bytes": 3 << 20, "materialized": "yes"},
            {"ref": "r/b:1", "digest": "sha256:" + "b" * 64, "format": "zstd:chunked",
             "use_count": 0, "bytes_fetched": 0, "bytes_served": 0, "prefetch": "pending"},
        ],
    }  # fmt: skip
    lines = format_status(doc).splitlines()
    header = next(x for x in lines if x.startswith("REFERENCE"))
    assert header.split()[-2:] == ["LOCAL", "MATERIALIZED"]
    a = next(x for x in lines if x.startswith("r/a:1"))
    assert a.split()[-2:] == ["3.0M", "yes"]
    b = next(x for x in lines if x.startswith("r/b:1"))  # an older daemon: no such fields
    assert b.split()[-2:] == ["-", "-"]
