"""``alsd convert SRC DST``: convert an image in a registry to eStargz and push it.

For each platform manifest of SRC (every image manifest of an index, or SRC itself): each
layer is downloaded (digest verified), rewritten with the eStargz writer and pushed with
the ``containerd.io/snapshot/stargz/toc.digest`` and
``io.containers.estargz.uncompressed-size`` annotations; the config's ``rootfs.diff_ids``
are replaced by the new layers' diff IDs (history and everything else kept); config and
manifest are pushed with OCI media types. An index SRC gives an OCI index at DST whose
entries keep their platforms. A layer that already is eStargz with a TOC matching its
annotation is copied as is (cross-repository mount when SRC and DST share a registry).

Progress goes to stderr, one line per layer; the pushed ``DST@digest`` to stdout. Any
failure is one line naming the reference, the host and the cause: exit status 1, or 2
for a usage or configuration error (alsd.toml, registries.conf, an auth file).

Concurrency: one event loop, layers converted one after the other (each is held in
memory whole, so doing several at once would multiply the peak); the CPU-bound writer runs
in a worker thread so the loop keeps connections alive meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from alsd.config import Config
from alsd.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    AlsdError,
    FormatError,
    IntegrityError,
    NotFound,
    exit_status_for,
)
from alsd.oci import formats
from alsd.oci.estargz_writer import (
    DEFAULT_CHUNK_SIZE,
    TOC_DIGEST_ANNOTATION,
    layer_descriptor,
    write_estargz,
)
from alsd.oci.layer_index import LayerFormat
from alsd.oci.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    parse_manifest,
)
from alsd.oci.profile import DEFAULT_LIMITS, Profile, parse_profile
from alsd.oci.reference import InvalidReference, Reference, parse_reference
from alsd.registry.client import RegistryClient
from alsd.registry.push import BlobPush, Pusher

_MAX_CONFIG_BYTES = 16 << 20
# Layers that carry no filesystem tar: converting them makes no sense.
_FOREIGN = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",)

Progress = Callable[[str], None]


# Files a container runtime reads from the image's root filesystem while it creates the
# container, before the entrypoint runs: podman and CRI-O look the user (root too) up in
# /etc/passwd and /etc/group. A trace of the entrypoint alone misses them, and each would
# cost an on-demand round trip while the runtime waits (seen in bench/: etc/group was
# the one read outside the prioritised region of a traced python image).
RUNTIME_FILES = ("etc/passwd", "etc/group")


def with_runtime_files(prioritized: Sequence[str]) -> tuple[str, ...]:
    """``prioritized`` (normalised, duplicates dropped) behind :data:`RUNTIME_FILES`, which
    the runtime reads first; empty stays empty (no prioritisation asked for, no landmark).
    Layers without those files just lack them (the writer skips missing names)."""
    if not prioritized:
        return ()
    return tuple(dict.fromkeys([*RUNTIME_FILES, *(_normalize(p) for p in prioritized)]))


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    prioritized: tuple[str, ...] = ()
    # --prioritize-profile: per source layer digest, the profile's files in its order;
    # such a layer is always rewritten (also when it already is eStargz).
    profile: Profile | None = None


def _stderr(line: str) -> None:
    print(f"alsd convert: {line}", file=sys.stderr, flush=True)


def _short(digest: str) -> str:
    return digest[:19]


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} B"


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class Converter:
    """Converts and pushes; holds the client, the pusher and the options."""

    def __init__(
        self,
        client: RegistryClient,
        options: ConvertOptions,
        progress: Progress = _stderr,
        *,
        pusher: Pusher | None = None,
    ) -> None:
        self.client = client
        self.pusher = pusher or Pusher(client)
        self.options = options
        self.progress = progress
        self._profile_layers = 0  # layers the --prioritize-profile profile named

    async def convert(self, src: Reference, dst: Reference) -> str:
        """Convert ``src`` and push it as ``dst``; returns the digest pushed at ``dst``."""
        top = await self.pusher.get_manifest(src)
        try:
            parsed = parse_manifest(top.body, top.content_type)
        except FormatError as exc:
            host = self.pusher.endpoint(src).host
            raise FormatError(f"{src}: manifest from {host}: {exc}") from exc
        self._profile_layers = 0
        if isinstance(parsed, Manifest):
            body = await self._convert_manifest(src, parsed, dst)
            self._check_profile_used(src)
            return await self.pusher.push_manifest(dst, body, OCI_MANIFEST)
        digest = await self._convert_index(src, parsed, top.body, dst)
        self._check_profile_used(src)
        return digest

    def _check_profile_used(self, src: Reference) -> None:
        if self.options.profile is not None and self._profile_layers == 0:
            raise FormatError(
                f"{src}: the prefetch profile names none of its layers (it was recorded for "
                "another image)"
            )

    def _prioritized_for(self, desc: Descriptor) -> tuple[tuple[str, ...], bool]:
        """The files to put first in this layer, and whether a profile named them."""
        profile = self.options.profile
        lp = profile.layer(desc.digest) if profile is not None else None
        if lp is None or not lp.entries:
            return self.options.prioritized, False
        self._profile_layers += 1
        return with_runtime_files([*self.options.prioritized, *(e.path for e in lp.entries)]), True

    async def _convert_index(self, src: Reference, index: Index, raw: bytes, dst: Reference) -> str:
        entries: list[dict[str, Any]] = json.loads(raw)["manifests"]
        out: list[dict[str, Any]] = []
        for n, (desc, entry) in enumerate(zip(index.manifests, entries, strict=True), 1):
            where = f"platform {desc.platform or '?'} ({n}/{len(entries)})"
            if desc.media_type in INDEX_TYPES or desc.media_type not in MANIFEST_TYPES:
                self.progress(f"{where}: {desc.media_type} {_short(desc.digest)} skipped")
                continue
            if desc.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
                # It attests the old manifest's digest: meaningless for the converted one.
                self.progress(f"{where}: attestation {_short(desc.digest)} dropped")
                continue
            self.progress(f"{where}: manifest {_short(desc.digest)}")
            child = src.with_digest(desc.digest)
            got = await self.pusher.get_manifest(src, desc.digest)
            try:
                m = parse_manifest(got.body, got.content_type or desc.media_type)
            except FormatError as exc:
                raise FormatError(f"{child}: {exc}") from exc
            if not isinstance(m, Manifest):
                raise FormatError(f"{child}: nested index is not supported")
            body = await self._convert_manifest(child, m, dst)
            digest = await self.pusher.push_manifest(
                dst, body, OCI_MANIFEST, tag="sha256:" + _sha256(body)
            )
            new_entry = {k: v for k, v in entry.items() if k not in ("mediaType", "digest", "size")}
            out.append(
                {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), **new_entry}
            )
        if not out:
            raise FormatError(f"{src}: the index holds no image manifest to convert")
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": out}
        if index.annotations:
            doc["annotations"] = dict(index.annotations)
        return await self.pusher.push_index(dst, _dumps(doc), OCI_INDEX)

    async def _convert_manifest(self, src: Reference, manifest: Manifest, dst: Reference) -> bytes:
        """Convert and push every layer and the config; returns the new manifest's bytes."""
        config_bytes = await self.client.fetch_blob(
            src, manifest.config.digest, max_bytes=_MAX_CONFIG_BYTES
        )
        try:
            config = json.loads(config_bytes)
            diff_ids = config["rootfs"]["diff_ids"]
            if not isinstance(diff_ids, list):
                raise TypeError("rootfs.diff_ids is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{src}: config {manifest.config.digest}: {exc}") from exc
        if len(diff_ids) != len(manifest.layers):
            raise FormatError(
                f"{src}: config has {len(diff_ids)} diff_ids for {len(manifest.layers)} layers"
            )
        layers: list[dict[str, Any]] = []
        new_diff_ids: list[str] = []
        for i, desc in enumerate(manifest.layers):
            label = f"layer {i + 1}/{len(manifest.layers)} {_short(desc.digest)}"
            layer, diff_id = await self._convert_layer(src, dst, desc, diff_ids[i], label)
            layers.append(layer)
            new_diff_ids.append(diff_id)
        config["rootfs"]["diff_ids"] = new_diff_ids
        new_config = _dumps(config)
        cfg_digest = "sha256:" + _sha256(new_config)
        await self.pusher.push_blob(dst, cfg_digest, new_config)
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(new_config)},
            "layers": layers,
        }
        if manifest.annotations:
            doc["annotations"] = dict(manifest.annotations)
        return _dumps(doc)

    def _mount_from(self, src: Reference, dst: Reference) -> list[str]:
        s, d = self.pusher.endpoint(src), self.pusher.endpoint(dst)
        return [s.repository] if (s.host, s.scheme) == (d.host, d.scheme) else []

    async def _convert_layer(
        self, src: Reference, dst: Reference, desc: Descriptor, diff_id: str, label: str
    ) -> tuple[dict[str, Any], str]:
        """Push one layer; returns its new descriptor and diff ID."""
        if desc.media_type in _FOREIGN or desc.urls:
            raise FormatError(f"{src}: {label}: foreign layer ({desc.media_type}) not converted")
        prioritized, from_profile = self._prioritized_for(desc)
        if not from_profile and await self._is_verified_estargz(src, desc):
            mount = self._mount_from(src, dst)
            got = await self._mount_only(dst, desc, mount) if mount else None
            if got is not None:
                how = got
            else:
                data = await self._download(src, desc)
                how = await self.pusher.push_blob(dst, desc.digest, data, mount_from=mount)
            self.progress(f"{label}: already eStargz, copied ({how})")
            out: dict[str, Any] = {
                "mediaType": OCI_LAYER_GZIP,
                "digest": desc.digest,
                "size": desc.size,
            }
            if desc.annotations:
                out["annotations"] = dict(desc.annotations)
            return out, diff_id
        self.progress(f"{label}: {_size(desc.size)} {desc.media_type}: downloading")
        data = await self._download(src, desc)
        opts = self.options
        try:
            result = await asyncio.to_thread(
                write_estargz,
                data,
                chunk_size=opts.chunk_size,
                prioritized=prioritized,
                allow_missing_prioritized=True,
            )
        except FormatError as exc:
            raise FormatError(f"{src}: {label}: cannot convert: {exc}") from exc
        del data
        new = layer_descriptor(result)
        how = await self.pusher.push_blob(dst, result.blob_digest, result.blob)
        self.progress(
            f"{label}: eStargz {_short(result.blob_digest)} {_size(len(result.blob))} "
            f"toc {_short(result.toc_digest)} ({how})"
        )
        return new, result.diff_id

    async def _download(self, src: Reference, desc: Descriptor) -> bytes:
        parts = [p async for p in self.client.read_blob(src, desc.digest)]
        data = b"".join(parts)
        if len(data) != desc.size:
            host = self.pusher.endpoint(src).host
            raise FormatError(
                f"{src}: blob {desc.digest} on {host} has {len(data)} bytes, "
                f"the manifest says {desc.size}"
            )
        return data

    async def _mount_only(
        self, dst: Reference, desc: Descriptor, mount: list[str]
    ) -> BlobPush | None:
        """Make the blob exist at ``dst`` without downloading it, if the registry can."""
        if await self.pusher.blob_exists(dst, desc.digest):
            return BlobPush.EXISTS
        mounted, _session = await self.pusher.mount(dst, desc.digest, mount[0])
        return BlobPush.MOUNTED if mounted else None

    async def _is_verified_estargz(self, src: Reference, desc: Descriptor) -> bool:
        """An eStargz layer whose TOC digest matches its annotation (read: tail + TOC)."""
        if TOC_DIGEST_ANNOTATION not in desc.annotations or desc.size <= 0:
            return False
        size = desc.size
        tail_start = max(0, size - formats.TAIL_SIZE)
        (tail,) = await self.client.read_ranges(src, desc.digest, [(tail_start, size)])
        try:
            loc = formats.detect(tail, size, desc.annotations, desc.media_type)
            if loc.format is not LayerFormat.ESTARGZ:
                return False
            (toc,) = await self.client.read_ranges(
                src, desc.digest, [(loc.offset, loc.offset + loc.length)]
            )
            index = formats.parse_toc(loc, toc, size, desc.annotations)
        except (FormatError, IntegrityError):  # NotLazyError is a FormatError
            return False  # not (valid) eStargz: convert it like any other layer
        return index.format is LayerFormat.ESTARGZ and index.verified


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------- command line


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"alsd {cmd}",
        description="convert an image in a registry to eStargz and push it",
    )
    p.add_argument("src", metavar="SRC", help="source image reference")
    p.add_argument("dst", metavar="DST", help="destination image reference (tag)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="eStargz chunk size in bytes (default %(default)s)",
    )
    p.add_argument(
        "--prioritize",
        action="append",
        default=[],
        metavar="FILE",
        help="a path in the image (e.g. bin/sh) to put before the prefetch landmark; "
        "repeatable. With any, etc/passwd and etc/group (read by the container runtime "
        "before the entrypoint) are prioritised first",
    )
    p.add_argument(
        "--prioritize-from",
        metavar="FILE",
        help="a local file listing paths to prioritize, one per line ('#' comments)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="alsd.toml to take the registry settings from (default /etc/alsd.toml)",
    )
    p.add_argument(
        "--prioritize-profile",
        metavar="REF-or-FILE",
        help="prioritise, per layer, the files of a prefetch profile, in its order: a "
        "profile document (FILE), or the profile of image REF (recorded by this host's "
        "alsd, see 'alsd profile show', else attached to REF in its registry); layers it "
        "names are rewritten even when they already are eStargz",
    )
    return p


def _read_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def _normalize(path: str) -> str:
    # The writer wants paths relative to "/" (as ctr-remote's record files have them).
    return os.path.normpath("/" + path).lstrip("/")


def one_line(msg: str) -> str:
    return " ".join(msg.split())


def main(cmd: str, argv: Sequence[str]) -> int:
    args = _parser(cmd).parse_args(list(argv))
    if args.chunk_size <= 0:
        print(f"alsd {cmd}: --chunk-size must be a number of bytes greater than 0", file=sys.stderr)
        return EXIT_USAGE
    prioritized = list(args.prioritize)
    if args.prioritize_from:
        try:
            prioritized += _read_list(args.prioritize_from)
        except OSError as exc:
            print(f"alsd {cmd}: --prioritize-from {args.prioritize_from}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        src = parse_reference(args.src)
        dst = parse_reference(args.dst)
    except InvalidReference as exc:
        print(f"alsd {cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if dst.digest is not None:
        print(f"alsd {cmd}: {args.dst}: DST must be a tag, not a digest", file=sys.stderr)
        return EXIT_USAGE
    options = ConvertOptions(
        chunk_size=args.chunk_size,
        prioritized=with_runtime_files(prioritized),
    )
    try:
        if args.prioritize_profile and os.path.isfile(args.prioritize_profile):
            options = replace(options, profile=_profile_file(args.prioritize_profile))
        digest = asyncio.run(_run(src, dst, options, args.config, args.prioritize_profile))
    except AlsdError as exc:
        # A missing or invalid alsd.toml, registries.conf or auth file: 2, like every
        # subcommand; anything else failed the conversion: 1.
        print(f"alsd {cmd}: {one_line(str(exc))}", file=sys.stderr)
        return exit_status_for(exc)
    except Exception as exc:  # a bug or an unmapped library error: still one line, exit 1
        print(f"alsd {cmd}: {src} -> {dst}: unexpected {exc!r}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{dst}@{digest}")
    return EXIT_OK


def _profile_file(path: str) -> Profile:
    try:
        with open(path, "rb") as f:
            data = f.read(DEFAULT_LIMITS.max_bytes + 1)
    except OSError as exc:
        raise FormatError(f"--prioritize-profile {path}: {exc.strerror}") from None
    try:
        return parse_profile(data)
    except FormatError as exc:
        raise FormatError(f"--prioritize-profile {path}: {exc}") from None


async def _profile_of(cfg: Config, client: RegistryClient, ref_text: str) -> Profile:
    """The profile of image ``ref_text``: recorded on this host, else in its registry."""
    from alsd.app.profiles import stored_profile
    from alsd.registry.referrers import ProfileRegistry

    try:
        return stored_profile(cfg, ref_text).profile
    except NotFound as local:
        ref = parse_reference(ref_text)
        resolved = await client.resolve(ref)
        found = await ProfileRegistry(client).find_profile(ref, resolved.manifest_digest)
        if found is None:
            raise NotFound(
                f"--prioritize-profile {ref_text}: no profile recorded here ({local}) nor "
                "attached to the image in its registry"
            ) from None
        return found.profile


async def _run(
    src: Reference,
    dst: Reference,
    options: ConvertOptions,
    cfg_path: str | None,
    profile_ref: str | None = None,
) -> str:
    from alsd import config
    from alsd.app.wiring import registry_client

    cfg = config.load(cfg_path)
    async with registry_client(cfg, cli_env=os.environ) as client:
        if profile_ref and options.profile is None:
            options = replace(options, profile=await _profile_of(cfg, client, profile_ref))
        return await Converter(client, options).convert(src, dst)
