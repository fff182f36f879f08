"""The layer descriptor annotations alsd reads and writes: the one place for their keys.

Pure. See developer-notes/protocol.md for what each producer writes.
"""

from __future__ import annotations

from collections.abc import Mapping

# eStargz (stargz-snapshotter, containers/image): digest of the TOC JSON, and the size of
# the uncompressed tar (so the diff size is known without reading the layer).
STARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"

# zstd:chunked (containers/storage): the TOC ("manifest") checksum and position, and the
# tar-split position; the older producers used the io.containers.* spelling.
ZSTD_CHUNKED_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_POSITION = "io.github.containers.zstd-chunked.manifest-position"
ZSTD_CHUNKED_TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
ZSTD_CHUNKED_OLD_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_OLD_POSITION = "io.containers.zstd-chunked.manifest-position"

# An index entry marking an attestation manifest (buildx), not an image.
DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"


def toc_digest_annotation(annotations: Mapping[str, str]) -> str | None:
    """The TOC digest as containers/image (>= 5.31) computes it from a layer descriptor:
    the eStargz annotation, else the zstd:chunked checksum (c/storage pkg/chunked/toc
    GetTOCDigest, in this order)."""
    return annotations.get(STARGZ_TOC_DIGEST) or annotations.get(ZSTD_CHUNKED_CHECKSUM) or None
