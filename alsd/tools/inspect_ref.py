"""``alsd inspect REF``: describe every layer of an image in a registry, lazily.

Resolves REF (registries.conf and credentials as podman finds them; the CLI-side
``REGISTRY_AUTH_FILE`` is honoured like podman does), then for each layer reads only
the blob's tail and its TOC with range requests — never a whole blob — and prints one
JSON object::

    {"reference", "manifest_digest", "layers": [{"digest", "media_type", "size",
     "format", "toc_digest", "verified", "prefetch"}], "bytes_fetched"}

A plain (not lazily pullable) layer has ``format``/``toc_digest``/``prefetch`` null.
Exit status 1 with a one-line reason when the image cannot be read.

Concurrency: layers are described concurrently on one event loop through one client.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from alsd.counters import ByteCounter
from alsd.errors import AlsdError, NotLazyError
from alsd.oci import formats, tocplan
from alsd.oci.manifest import Descriptor
from alsd.oci.reference import Reference, parse_reference
from alsd.registry.client import RegistryClient


async def describe_layer(
    client: RegistryClient,
    ref: Reference,
    desc: Descriptor,
    counter: ByteCounter,
    *,
    max_toc_bytes: int = formats.DEFAULT_MAX_TOC_BYTES,
) -> dict[str, Any]:
    """Footer, then TOC, by range requests; raises AlsdError for a corrupt lazy layer."""
    out: dict[str, Any] = {
        "digest": desc.digest,
        "media_type": desc.media_type,
        "size": desc.size,
        "format": None,
        "toc_digest": None,
        "verified": False,
        "prefetch": None,
    }
    if desc.size <= 0:
        return out

    async def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return await client.read_ranges(ref, desc.digest, ranges, counter=counter)

    try:
        toc = await tocplan.read_layer_index(
            read,
            name=f"{ref} {desc.digest}",
            blob_size=desc.size,
            annotations=desc.annotations,
            media_type=desc.media_type,
            max_toc_bytes=max_toc_bytes,
            want_uncompressed_size=False,
        )
    except NotLazyError:
        return out
    index = toc.index
    out.update(
        format=str(index.format),
        toc_digest=index.toc_digest,
        verified=index.verified,
        prefetch=index.prefetch,
    )
    return out


async def describe_image(client: RegistryClient, ref: Reference) -> dict[str, Any]:
    counter = ByteCounter()
    img = await client.resolve(ref, counter=counter)
    layers = await asyncio.gather(
        *(describe_layer(client, ref, d, ByteCounter(counter)) for d in img.manifest.layers)
    )
    return {
        "reference": str(ref),
        "manifest_digest": img.manifest_digest,
        "layers": list(layers),
        "bytes_fetched": counter.bytes,
    }


def make_client(env: Mapping[str, str] | None = None) -> RegistryClient:
    """A client configured like the daemon's (alsd.toml, registries.conf, auth files), plus
    what podman's CLI honours (``REGISTRY_AUTH_FILE``)."""
    from alsd import config
    from alsd.app import wiring

    return wiring.registry_client(
        config.load(None), cli_env=os.environ if env is None else env
    )


async def _run(text: str) -> dict[str, Any]:
    ref = parse_reference(text)
    async with make_client() as client:
        return await describe_image(client, ref)


def run(text: str) -> int:
    try:
        result = asyncio.run(_run(text))
    except AlsdError as exc:
        print(f"alsd inspect: {text}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0
