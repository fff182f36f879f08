"""Words and numbers for people, as every command prints them (pure)."""

from __future__ import annotations

from typing import Any

from alsd.errors import NotLazyError, PlainLayer

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# What a person can do about a layer that is not lazily pullable.
NOT_LAZY_HINT = (
    "podman pulls it whole; `alsd convert SRC DST` pushes an eStargz copy of the image "
    "that can be pulled lazily"
)


def human_bytes(n: Any) -> str:
    """Binary units, as the demo's summary prints them: ``11.7 MiB``; ``-`` if unknown."""
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def duration(seconds: Any) -> str:
    """``42s``, ``5m 12s``, ``3h 4m``, ``2d 5h``; ``-`` if unknown."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def not_lazy_reason(exc: Exception, media_type: str | None, head: bytes = b"") -> str:
    """Why a valid layer cannot be pulled lazily, in words for a person."""
    if isinstance(exc, NotLazyError) and not isinstance(exc, PlainLayer):
        return str(exc)  # a lazy format alsd does not support (eStargz with an external TOC)
    mt = media_type or ""
    if mt.endswith("gzip") or head.startswith(GZIP_MAGIC):
        kind = "gzip"
    elif mt.endswith("zstd") or head.startswith(ZSTD_MAGIC):
        kind = "zstd"
    else:
        kind = "uncompressed tar"
    return (
        f"a plain {kind} layer: it has no table of contents (no eStargz footer, no "
        "zstd:chunked manifest), so none of its files can be read without downloading "
        "all of it"
    )
