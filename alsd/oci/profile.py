"""Prefetch profiles: which files an image's containers read first, per layer.

A profile is alsd's own JSON document (media type :data:`PROFILE_MEDIA_TYPE`)::

    {"mediaType": "application/vnd.alsd.prefetch-profile.v1+json",
     "layers": [{"digest": "sha256:<layer blob digest>",
                 "entries": [{"path": "usr/bin/python3", "offset": 0, "length": 4096}, ...]},
                ...]}

Per layer blob digest, the entries are the regular files read, in the order they were
first read, each with the offset and length of that first read. A profile only says what
to fetch first: it never changes what a file contains (every chunk is still verified
against the layer's TOC), so the worst a hostile profile can do is waste some prefetch.

This module is pure (bytes in, frozen dataclasses out):

* :func:`parse_profile` / :func:`serialize_profile`: strict, bounded parsing
  (:class:`ProfileLimits`) and canonical serialisation;
* :func:`merge_profiles`: union across runs in first-seen order, bounded;
* :func:`check_against_image`: keep only the entries a verified layer index can serve,
  reporting each problem once (the caller logs one line per problem);
* :func:`profile_chunks` / :func:`covered_ranges`: the chunks and compressed byte ranges
  the entries cover, in entry order;
* the OCI 1.1 artifact that carries a profile (:func:`artifact_manifest`,
  :func:`parse_artifact_manifest`) and the referrers index of the distribution spec's
  referrers tag schema (:func:`parse_referrers`, :func:`add_referrer`,
  :func:`referrers_tag`).

The protocol facts this relies on (artifact manifests, the empty descriptor, the
referrers API and tag schema) are in developer-notes/profiles.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from alsd.errors import FormatError
from alsd.oci.layer_index import Chunk, EntryKind, LayerIndex
from alsd.oci.manifest import OCI_INDEX, OCI_MANIFEST, sha256_digest
from alsd.oci.ranges import merge_ranges

#: Media type of the profile document and ``artifactType`` of the artifact carrying it.
PROFILE_MEDIA_TYPE = "application/vnd.alsd.prefetch-profile.v1+json"
ARTIFACT_TYPE = PROFILE_MEDIA_TYPE
#: OCI 1.1 empty descriptor: the config of an artifact that has none.
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = sha256_digest(EMPTY_BLOB)
#: Annotation with the creation time (RFC 3339) of an artifact, used to pick the newest.
ANNOTATION_CREATED = "org.opencontainers.image.created"

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ProfileLimits:
    """Bounds on a profile; a document beyond them is refused, a merge stops at them."""

    max_bytes: int = 1 << 20
    max_layers: int = 256
    max_entries: int = 4096  # per layer
    max_path_bytes: int = 4096


DEFAULT_LIMITS = ProfileLimits()


@dataclass(frozen=True, slots=True)
class ProfileEntry:
    path: str  # normalised, relative to the layer root ("usr/bin/python3")
    offset: int  # first offset read
    length: int  # length of that first read (> 0)


@dataclass(frozen=True, slots=True)
class LayerProfile:
    digest: str  # layer blob digest
    entries: tuple[ProfileEntry, ...]


@dataclass(frozen=True, slots=True)
class Profile:
    layers: tuple[LayerProfile, ...] = ()

    def layer(self, digest: str) -> LayerProfile | None:
        for lp in self.layers:
            if lp.digest == digest:
                return lp
        return None

    def entry_count(self) -> int:
        return sum(len(lp.entries) for lp in self.layers)


# ==================================================================== document


def _check_digest(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise FormatError(f"{what}: digest must be a string")
    algo, sep, hexpart = v.partition(":")
    want = {"sha256": 64, "sha512": 128}.get(algo)
    if not sep or want is None or len(hexpart) != want or hexpart.strip("0123456789abcdef"):
        raise FormatError(f"{what}: bad digest {v[:80]!r}")
    return v


def _check_path(v: Any, what: str, limits: ProfileLimits) -> str:
    if not isinstance(v, str) or not v:
        raise FormatError(f"{what}: 'path' must be a non-empty string")
    if len(v.encode("utf-8", "surrogatepass")) > limits.max_path_bytes:
        raise FormatError(f"{what}: path longer than {limits.max_path_bytes} bytes")
    if "\x00" in v:
        raise FormatError(f"{what}: NUL byte in path")
    parts = [p for p in v.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise FormatError(f"{what}: path {v[:80]!r} does not name a file inside the layer")
    return "/".join(parts)


def _nonneg_int(d: Mapping[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 63:
        raise FormatError(f"{what}: {key!r} must be a non-negative integer")
    return v


def _load_json(data: bytes, max_bytes: int, what: str) -> Any:
    """``data`` as JSON, refused (:class:`FormatError`) above ``max_bytes`` or malformed."""
    if len(data) > max_bytes:
        raise FormatError(f"{what} of {len(data)} bytes exceeds {max_bytes} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"{what} is not JSON: {exc}") from None


def parse_profile(data: bytes, limits: ProfileLimits = DEFAULT_LIMITS) -> Profile:
    """Parse a profile document; :class:`FormatError` names the first problem.

    Refused: more than ``max_bytes``, not JSON, another media type, unknown fields, more
    than ``max_layers`` layers or ``max_entries`` entries in a layer, a layer listed twice,
    bad digests, paths that are empty, absolute-escaping or too long, negative offsets,
    zero lengths. Entries for a path already listed in the same layer are dropped (the
    first one counts).
    """
    doc = _load_json(data, limits.max_bytes, "profile")
    if not isinstance(doc, dict):
        raise FormatError("profile: expected a JSON object")
    extra = set(doc) - {"mediaType", "layers"}
    if extra:
        raise FormatError(f"profile: unknown field(s) {sorted(extra)[:5]}")
    if doc.get("mediaType") != PROFILE_MEDIA_TYPE:
        raise FormatError(
            f"profile: mediaType must be {PROFILE_MEDIA_TYPE!r}, got {doc.get('mediaType')!r:.100}"
        )
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError("profile: 'layers' must be a list")
    if len(layers) > limits.max_layers:
        raise FormatError(f"profile: {len(layers)} layers, at most {limits.max_layers}")
    out: list[LayerProfile] = []
    seen: set[str] = set()
    for i, lp in enumerate(layers):
        what = f"profile layer {i}"
        if not isinstance(lp, dict):
            raise FormatError(f"{what}: expected a JSON object")
        extra = set(lp) - {"digest", "entries"}
        if extra:
            raise FormatError(f"{what}: unknown field(s) {sorted(extra)[:5]}")
        digest = _check_digest(lp.get("digest"), what)
        if digest in seen:
            raise FormatError(f"{what}: layer {digest} listed twice")
        seen.add(digest)
        entries = lp.get("entries")
        if not isinstance(entries, list):
            raise FormatError(f"{what}: 'entries' must be a list")
        if len(entries) > limits.max_entries:
            raise FormatError(f"{what}: {len(entries)} entries, at most {limits.max_entries}")
        parsed: list[ProfileEntry] = []
        paths: set[str] = set()
        for j, e in enumerate(entries):
            ewhat = f"{what} entry {j}"
            if not isinstance(e, dict):
                raise FormatError(f"{ewhat}: expected a JSON object")
            extra = set(e) - {"path", "offset", "length"}
            if extra:
                raise FormatError(f"{ewhat}: unknown field(s) {sorted(extra)[:5]}")
            path = _check_path(e.get("path"), ewhat, limits)
            offset = _nonneg_int(e, "offset", ewhat)
            length = _nonneg_int(e, "length", ewhat)
            if length == 0:
                raise FormatError(f"{ewhat}: 'length' must be positive")
            if path in paths:
                continue
            paths.add(path)
            parsed.append(ProfileEntry(path, offset, length))
        out.append(LayerProfile(digest, tuple(parsed)))
    return Profile(tuple(out))


def profile_to_json(profile: Profile) -> dict[str, Any]:
    return {
        "mediaType": PROFILE_MEDIA_TYPE,
        "layers": [
            {
                "digest": lp.digest,
                "entries": [
                    {"path": e.path, "offset": e.offset, "length": e.length} for e in lp.entries
                ],
            }
            for lp in profile.layers
        ],
    }


def serialize_profile(profile: Profile) -> bytes:
    """Canonical bytes (compact JSON, fixed key order): same profile, same digest."""
    return json.dumps(profile_to_json(profile), separators=(",", ":")).encode()


def merge_profiles(
    first: Profile, then: Profile, limits: ProfileLimits = DEFAULT_LIMITS
) -> Profile:
    """``first`` then what ``then`` adds, in first-seen order, within ``limits``.

    Layers keep the order in which they were first seen; within a layer a path keeps its
    first position, offset and length. Entries beyond ``max_entries`` per layer and layers
    beyond ``max_layers`` are left out (the earliest reads are the ones worth keeping).
    """
    layers: dict[str, list[ProfileEntry]] = {}
    paths: dict[str, set[str]] = {}
    for lp in (*first.layers, *then.layers):
        if lp.digest not in layers:
            if len(layers) >= limits.max_layers:
                continue
            layers[lp.digest] = []
            paths[lp.digest] = set()
        have, seen = layers[lp.digest], paths[lp.digest]
        for e in lp.entries:
            if len(have) >= limits.max_entries:
                break
            if e.path not in seen:
                seen.add(e.path)
                have.append(e)
    return Profile(tuple(LayerProfile(d, tuple(es)) for d, es in layers.items()))


# ==================================================================== against an image


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a profile for an image; the caller logs one line for it."""

    layer: str  # layer digest
    message: str


def check_against_image(
    profile: Profile, indexes: Mapping[str, LayerIndex]
) -> tuple[Profile, list[Problem]]:
    """Keep what the image's verified layers can serve; report the rest.

    ``indexes`` maps each layer blob digest of the image to its verified index. A layer
    the image does not have is dropped (one problem per layer); entries whose path is not
    a regular file in the TOC, or whose offset is past the file's end, are dropped (one
    problem per layer and kind, with a count and the first example); lengths are clipped
    to the file's end.
    """
    problems: list[Problem] = []
    kept: list[LayerProfile] = []
    for lp in profile.layers:
        idx = indexes.get(lp.digest)
        if idx is None:
            problems.append(
                Problem(lp.digest, f"layer {lp.digest} is not a layer of this image; ignored")
            )
            continue
        missing: list[str] = []
        past_end: list[str] = []
        entries: list[ProfileEntry] = []
        for e in lp.entries:
            node = idx.find(e.path)
            if node is None or idx.attr(node).kind != EntryKind.REG:
                missing.append(e.path)
                continue
            size = idx.attr(node).size
            if e.offset >= size:
                if size or e.offset:
                    past_end.append(e.path)
                continue
            entries.append(ProfileEntry(e.path, e.offset, min(e.length, size - e.offset)))
        if missing:
            problems.append(
                Problem(
                    lp.digest,
                    f"layer {lp.digest}: {len(missing)} entr{'y' if len(missing) == 1 else 'ies'}"
                    f" name no regular file in the TOC (first: {missing[0][:200]!r}); ignored",
                )
            )
        if past_end:
            problems.append(
                Problem(
                    lp.digest,
                    f"layer {lp.digest}: {len(past_end)} entr"
                    f"{'y' if len(past_end) == 1 else 'ies'} start past the file's end "
                    f"(first: {past_end[0][:200]!r}); ignored",
                )
            )
        if entries:
            kept.append(LayerProfile(lp.digest, tuple(entries)))
    return Profile(tuple(kept)), problems


def profile_chunks(index: LayerIndex, entries: Iterable[ProfileEntry]) -> list[tuple[int, Chunk]]:
    """The chunks the entries cover, as (node, chunk), in entry order, each chunk once.

    Entries that name no regular file are skipped (see :func:`check_against_image`);
    all-zero chunks need no fetch and are left out.
    """
    out: list[tuple[int, Chunk]] = []
    seen: set[str] = set()
    for e in entries:
        node = index.find(e.path)
        if node is None or index.attr(node).kind != EntryKind.REG:
            continue
        for c in index.chunks_in_range(node, e.offset, e.length):
            if c.zeros or c.digest in seen:
                continue
            seen.add(c.digest)
            out.append((node, c))
    return out


def covered_ranges(chunks: Iterable[tuple[int, Chunk]]) -> list[tuple[int, int]]:
    """The compressed ranges ``[start, end)`` of the blob that hold ``chunks`` (merged)."""
    return merge_ranges([(c.blob_offset, c.fetch_end) for _, c in chunks])


def covered_bytes(chunks: Iterable[tuple[int, Chunk]]) -> int:
    return sum(e - s for s, e in covered_ranges(chunks))


# ==================================================================== OCI artifact


@dataclass(frozen=True, slots=True)
class Referrer:
    """One entry of a referrers index (API answer or tag-schema index)."""

    media_type: str
    digest: str
    size: int
    artifact_type: str | None
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def artifact_manifest(
    profile_blob: bytes,
    subject_media_type: str,
    subject_digest: str,
    subject_size: int,
    *,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """The OCI 1.1 image manifest carrying ``profile_blob`` and pointing at its image.

    ``artifactType`` is :data:`ARTIFACT_TYPE`, the config is the empty descriptor
    (``application/vnd.oci.empty.v1+json``, the two bytes ``{}``) and the profile is the
    one layer; ``subject`` is the image manifest the profile belongs to.
    """
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": 2},
        "layers": [
            {
                "mediaType": PROFILE_MEDIA_TYPE,
                "digest": sha256_digest(profile_blob),
                "size": len(profile_blob),
            }
        ],
        "subject": {
            "mediaType": subject_media_type,
            "digest": subject_digest,
            "size": subject_size,
        },
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return _dumps(doc)


@dataclass(frozen=True, slots=True)
class ProfileArtifact:
    """What a fetched artifact manifest says about its profile blob."""

    blob_digest: str
    blob_size: int


def parse_artifact_manifest(
    data: bytes, subject_digest: str, limits: ProfileLimits = DEFAULT_LIMITS
) -> ProfileArtifact:
    """Check an artifact manifest found for image ``subject_digest``; the profile blob.

    Refused (:class:`FormatError`): not an OCI image manifest, another ``artifactType``,
    a ``subject`` other than the image, not exactly one layer of the profile media type,
    a blob larger than ``limits.max_bytes``.
    """
    doc = _load_json(data, 64 << 10, "profile artifact manifest")
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise FormatError("profile artifact: not a schemaVersion 2 manifest")
    if doc.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST:
        raise FormatError(f"profile artifact: media type {doc.get('mediaType')!r:.100}")
    art = doc.get("artifactType")
    if art is None:
        cfg = doc.get("config")
        art = cfg.get("mediaType") if isinstance(cfg, dict) else None
    if art != ARTIFACT_TYPE:
        raise FormatError(f"profile artifact: artifactType {art!r:.100}, not {ARTIFACT_TYPE}")
    subject = doc.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != subject_digest:
        got = subject.get("digest") if isinstance(subject, dict) else None
        raise FormatError(f"profile artifact: subject {got!r:.100} is not {subject_digest}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise FormatError("profile artifact: expected exactly one layer")
    blob = layers[0]
    if blob.get("mediaType") != PROFILE_MEDIA_TYPE:
        raise FormatError(f"profile artifact: layer media type {blob.get('mediaType')!r:.100}")
    digest = _check_digest(blob.get("digest"), "profile artifact layer")
    size = blob.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError("profile artifact layer: 'size' must be a non-negative integer")
    if size > limits.max_bytes:
        raise FormatError(f"profile of {size} bytes exceeds {limits.max_bytes} bytes")
    return ProfileArtifact(digest, size)


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for an image manifest digest: ``sha256-<hex>``."""
    algo, sep, hexpart = digest.partition(":")
    if not sep or not algo or not hexpart:
        raise FormatError(f"bad digest {digest!r}")
    return f"{algo}-{hexpart}"[:128]


def _referrer(v: Any, what: str) -> Referrer | None:
    if not isinstance(v, dict):
        return None
    mt, dg, size = v.get("mediaType"), v.get("digest"), v.get("size")
    if not isinstance(mt, str) or not isinstance(dg, str) or ":" not in dg:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    art = v.get("artifactType")
    ann = v.get("annotations")
    annotations: Mapping[str, str] = _EMPTY
    if isinstance(ann, dict) and all(
        isinstance(k, str) and isinstance(x, str) for k, x in ann.items()
    ):
        annotations = MappingProxyType(dict(ann))
    return Referrer(mt, dg, size, art if isinstance(art, str) else None, annotations)


def parse_referrers(data: bytes, *, max_bytes: int = 4 << 20) -> list[Referrer]:
    """The entries of a referrers index (API answer or tag-schema tag).

    :class:`FormatError` when the document is not an image index at all (a registry
    without the referrers API may answer with something else); malformed entries are
    skipped (they are other tools' business).
    """
    doc = _load_json(data, max_bytes, "referrers index")
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise FormatError("referrers: not a schemaVersion 2 image index")
    if doc.get("mediaType", OCI_INDEX) != OCI_INDEX:
        raise FormatError(f"referrers: media type {doc.get('mediaType')!r:.100}")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise FormatError("referrers: 'manifests' must be a list")
    out: list[Referrer] = []
    for i, e in enumerate(entries):
        r = _referrer(e, f"referrer {i}")
        if r is not None:
            out.append(r)
    return out


def profile_referrers(referrers: Sequence[Referrer]) -> list[Referrer]:
    """The profile artifacts among ``referrers``, newest first.

    Newest by the ``org.opencontainers.image.created`` annotation (RFC 3339 strings of one
    producer compare as text); entries without it come last, in index order reversed (the
    tag schema appends).
    """
    ours = [(i, r) for i, r in enumerate(referrers) if r.artifact_type == ARTIFACT_TYPE]
    ours.sort(key=lambda ir: (ir[1].annotations.get(ANNOTATION_CREATED, ""), ir[0]), reverse=True)
    return [r for _, r in ours]


def add_referrer(index: bytes | None, descriptor: Mapping[str, Any]) -> bytes:
    """The referrers tag-schema index with ``descriptor`` added.

    ``index`` is the current content of the tag (None when there is none). Every other
    entry is kept exactly as it was (unknown fields included); an entry with the same
    digest is replaced. :class:`FormatError` when ``index`` is not an image index, since
    overwriting it would drop what others stored there.
    """
    if index is None:
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    else:
        parse_referrers(index)  # refuse anything but an index
        doc = json.loads(index)
        doc.setdefault("mediaType", OCI_INDEX)
    manifests = [
        m
        for m in doc["manifests"]
        if not (isinstance(m, dict) and m.get("digest") == descriptor.get("digest"))
    ]
    manifests.append(dict(descriptor))
    doc["manifests"] = manifests
    return _dumps(doc)


def referrer_descriptor(
    manifest: bytes, *, annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The index entry for an artifact manifest (what the referrers API would list)."""
    d: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": sha256_digest(manifest),
        "size": len(manifest),
        "artifactType": ARTIFACT_TYPE,
    }
    if annotations:
        d["annotations"] = dict(annotations)
    return d
