"""``alsd inspect REF``: can every layer of an image in a registry be pulled lazily.

Resolves REF (alsd.toml's registries.conf and credentials, as the daemon finds them; the
CLI-side ``REGISTRY_AUTH_FILE`` is honoured like podman does), then for each layer reads
only the blob's tail and its TOC with range requests — never a whole blob — and prints a
table, or with ``--json`` one object::

    {"reference", "manifest_digest", "layers": [{"digest", "media_type", "size", "lazy",
     "reason", "format", "toc_digest", "verified", "prefetch"}], "bytes_fetched"}

A plain (not lazily pullable) layer has ``lazy`` false, ``reason`` saying why and
``format``/``toc_digest``/``prefetch`` null. Exit status 0 when every layer is lazily
pullable; 1 when one is not (named on stderr) or the image cannot be read (one line);
2 for a configuration error.

Concurrency: layers are described concurrently on one event loop through one client.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from alsd.config import Config
from alsd.counters import ByteCounter
from alsd.errors import EXIT_FAILED, EXIT_OK, AlsdError, NotLazyError, exit_status_for
from alsd.oci import formats, tocplan
from alsd.oci.manifest import Descriptor
from alsd.oci.reference import Reference, parse_reference
from alsd.registry.client import RegistryClient
from alsd.tools.text import NOT_LAZY_HINT, human_bytes, not_lazy_reason


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
        "lazy": False,
        "reason": "an empty blob",
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
    except NotLazyError as exc:
        out["reason"] = not_lazy_reason(exc, desc.media_type)
        return out
    index = toc.index
    out.update(
        lazy=True,
        reason=None,
        format=str(index.format),
        toc_digest=index.toc_digest,
        verified=index.verified,
        prefetch=index.prefetch,
    )
    return out


async def describe_image(
    client: RegistryClient, ref: Reference, *, max_toc_bytes: int = formats.DEFAULT_MAX_TOC_BYTES
) -> dict[str, Any]:
    counter = ByteCounter()
    img = await client.resolve(ref, counter=counter)
    layers = await asyncio.gather(
        *(
            describe_layer(client, ref, d, ByteCounter(counter), max_toc_bytes=max_toc_bytes)
            for d in img.manifest.layers
        )
    )
    return {
        "reference": str(ref),
        "manifest_digest": img.manifest_digest,
        "layers": list(layers),
        "bytes_fetched": counter.bytes,
    }


def make_client(cfg: Config, env: Mapping[str, str] | None = None) -> RegistryClient:
    """A client configured like the daemon's (alsd.toml, registries.conf, auth files), plus
    what podman's CLI honours (``REGISTRY_AUTH_FILE``)."""
    from alsd.app import wiring

    return wiring.registry_client(cfg, cli_env=os.environ if env is None else env)


async def _run(text: str, cfg: Config, max_toc_bytes: int) -> dict[str, Any]:
    ref = parse_reference(text)
    async with make_client(cfg) as client:
        return await describe_image(client, ref, max_toc_bytes=max_toc_bytes)


def format_image(result: Mapping[str, Any]) -> str:
    """The text ``alsd inspect REF`` prints: one line per layer."""
    layers = result["layers"]
    lazy = sum(1 for la in layers if la["lazy"])
    if lazy == len(layers):
        verdict = f"lazily pullable ({len(layers)} layers)"
    else:
        verdict = f"{len(layers) - lazy} of {len(layers)} layers not lazily pullable"
    header = ("LAYER", "SIZE", "FORMAT", "TOC", "PRIORITISED")
    rows = []
    for la in layers:
        if la["lazy"]:
            toc = "verified" if la["verified"] else "unverified"
            prio = {"landmark": "yes", "none": "none"}.get(str(la["prefetch"]), "no landmark")
            rows.append((la["digest"][:19], human_bytes(la["size"]), la["format"], toc, prio))
        else:
            rows.append((la["digest"][:19], human_bytes(la["size"]), "plain", "-", "-"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"{result['reference']}: {verdict}", f"  manifest  {result['manifest_digest']}"]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.append(
        f"  read {human_bytes(result['bytes_fetched'])} from the registry (manifest, config, "
        "footers and TOCs)"
    )
    return "\n".join(lines)


def run(
    text: str,
    cfg: Config,
    *,
    json_output: bool = False,
    max_toc_bytes: int = formats.DEFAULT_MAX_TOC_BYTES,
) -> int:
    try:
        result = asyncio.run(_run(text, cfg, max_toc_bytes))
    except AlsdError as exc:
        print(f"alsd inspect: {text}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exit_status_for(exc)
    print(json.dumps(result, sort_keys=True) if json_output else format_image(result))
    plain = [la for la in result["layers"] if not la["lazy"]]
    if plain:
        reasons = sorted({la["reason"] for la in plain})
        print(
            f"alsd inspect: {text}: {len(plain)} of {len(result['layers'])} layers not lazily "
            f"pullable: {'; '.join(reasons)}; {NOT_LAZY_HINT}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK
