"""The ALS ``info`` file in both protocol generations (spec.md §1.6), as bytes.

containers/storage decodes ``info`` into its ``Layer`` struct and believes it: the
diff_id becomes the layer ID (podman <= 5.0), the sizes go into layers.json, and a type
error aborts the pull. So every value here comes from the image (manifest, config, TOC or
tar-split), never from a guess, and the JSON types are exactly what Go expects.

- old generation (directory named by the compressed blob digest, podman <= 5.0):
  ``compressed-diff-digest``, ``compressed-size``, ``diff-digest`` (the config's diff_id;
  podman 4.3 panics without it), ``diff-size`` (exact; -1 breaks ``podman run`` and 0 breaks
  ``podman save`` there), ``compression`` (2 gzip, 4 zstd; a JSON number).
- new generation (directory named by the TOC digest, podman >= 5.1): ``toc-digest`` (must
  equal the directory name), ``flags.expected-layer-diffid``, the compressed fields,
  ``diff-size`` (-1 = unknown is documented and accepted there) and ``compression``.

Pure; no I/O except one warning log line per layer served with an unknown size.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

from alsd.errors import NotLazyError

log = logging.getLogger(__name__)

# containers/storage pkg/archive Compression values.
COMPRESSION_GZIP = 2
COMPRESSION_ZSTD = 4

UnknownDiffSize = Literal["lazy-zero", "fallback"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_warned: set[str] = set()


def compression_for(layer_format: str) -> int:
    """The ``compression`` number for a layer format name ("estargz", "stargz",
    "zstd:chunked")."""
    return COMPRESSION_ZSTD if layer_format.startswith("zstd") else COMPRESSION_GZIP


def _check_digest(what: str, value: str) -> None:
    if not _DIGEST.match(value):
        raise ValueError(f"{what} must be sha256:<64 hex>, got {value!r}")


def _check_common(blob_digest: str, blob_size: int, diff_id: str, compression: int) -> None:
    _check_digest("blob digest", blob_digest)
    _check_digest("diff_id", diff_id)
    if blob_size <= 0:
        raise ValueError(f"blob size must be > 0, got {blob_size}")
    if compression not in (COMPRESSION_GZIP, COMPRESSION_ZSTD):
        raise ValueError(f"compression must be 2 or 4, got {compression}")


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def old_diff_size(
    diff_size: int | None, policy: UnknownDiffSize, *, ref: str, blob_digest: str
) -> int:
    """The ``diff-size`` to announce to podman <= 5.0 for a size that may be unknown.

    Unknown + "fallback" raises :class:`NotLazyError` (podman then pulls the layer itself);
    unknown + "lazy-zero" answers 0 and logs once per layer that ``podman save`` will fail.
    """
    if diff_size is not None:
        if diff_size < 0:
            raise ValueError(f"diff size must be >= 0, got {diff_size}")
        return diff_size
    if policy == "fallback":
        raise NotLazyError(
            f"{ref} {blob_digest}: uncompressed size unknown without reading the whole layer "
            'and [layers] unknown_diff_size = "fallback"'
        )
    if blob_digest not in _warned:
        _warned.add(blob_digest)
        log.warning(
            "%s %s: uncompressed size unknown, announcing diff-size 0: podman run works, "
            "podman save/push of this image will fail on podman <= 5.0 "
            '(set [layers] unknown_diff_size = "fallback" to have podman pull it instead)',
            ref,
            blob_digest,
        )
    return 0


def info_old(
    *, blob_digest: str, blob_size: int, diff_id: str, diff_size: int, compression: int
) -> bytes:
    """``info`` for a directory named by the compressed blob digest (podman <= 5.0)."""
    _check_common(blob_digest, blob_size, diff_id, compression)
    if diff_size < 0:
        raise ValueError(f"old-generation diff-size must be >= 0, got {diff_size}")
    return _dump(
        {
            "compressed-diff-digest": blob_digest,
            "compressed-size": blob_size,
            "diff-digest": diff_id,
            "diff-size": diff_size,
            "compression": compression,
        }
    )


def info_new(
    *,
    toc_digest: str,
    blob_digest: str,
    blob_size: int,
    diff_id: str,
    diff_size: int | None,
    compression: int,
) -> bytes:
    """``info`` for a directory named by the TOC digest (podman >= 5.1).

    ``diff_size`` None (unknown) becomes -1, which containers/storage documents for
    TOC-identified layers ("either valid or -1") and podman 5.4 accepts for run and save.
    """
    _check_common(blob_digest, blob_size, diff_id, compression)
    _check_digest("TOC digest", toc_digest)
    return _dump(
        {
            "toc-digest": toc_digest,
            "flags": {"expected-layer-diffid": diff_id},
            "compressed-diff-digest": blob_digest,
            "compressed-size": blob_size,
            "diff-size": -1 if diff_size is None else diff_size,
            "compression": compression,
        }
    )
