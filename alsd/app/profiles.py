"""The daemon's recorded prefetch profiles, read from its state directory (for commands).

``alsd profile show|push`` and ``alsd convert --prioritize-profile`` read what the daemon
recorded (:mod:`alsd.layers.profiles`) from ``state_dir/metadata``: the image record of a
reference (manifest as served), the profile of its manifest digest, and the layer records
whose verified indexes say which chunks, and how many compressed bytes, the entries
cover. Metadata files are replaced atomically, so reading them while the daemon runs is
safe; what a running daemon has not saved yet (a recording still in its window) is not
there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alsd.config import Config
from alsd.errors import AlsdError, InvalidReference, NotFound
from alsd.layers.model import Image
from alsd.layers.profiles import PROFILE_KIND, profile_from_record
from alsd.layers.records import IMAGE, LAYER, image_from_record, layer_from_record, layer_key
from alsd.oci.layer_index import LayerIndex
from alsd.oci.profile import Profile, covered_bytes, profile_chunks
from alsd.oci.reference import parse_reference
from alsd.storage.metadata import MetadataStore


@dataclass(frozen=True)
class StoredProfile:
    ref: str  # the reference the image was resolved under
    image: Image
    profile: Profile
    indexes: dict[str, LayerIndex]  # layer digest -> verified index (layers with a record)

    def to_json(self) -> dict[str, Any]:
        layers = []
        for lp in self.profile.layers:
            idx = self.indexes.get(lp.digest)
            layers.append(
                {
                    "digest": lp.digest,
                    "entries": [
                        {"path": e.path, "offset": e.offset, "length": e.length}
                        for e in lp.entries
                    ],
                    # None when the layer's record (its TOC) is not in the state directory.
                    "compressed_bytes": (
                        covered_bytes(profile_chunks(idx, lp.entries)) if idx else None
                    ),
                }
            )
        return {"ref": self.ref, "digest": self.image.digest, "layers": layers}


def _same_ref(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return str(parse_reference(a)) == str(parse_reference(b))
    except (InvalidReference, AlsdError):
        return False


def stored_profile(cfg: Config, ref: str) -> StoredProfile:
    """The recorded profile of the image ``ref`` names (by reference or ``@digest``).

    Raises :class:`NotFound` naming what is missing (the image was never run through
    this daemon, or nothing of it was recorded yet).
    """
    meta = MetadataStore(Path(cfg.state_dir) / "metadata")
    images: list[Image] = []
    for _, rec in meta.iter(IMAGE):
        try:
            images.append(image_from_record(rec))
        except (AlsdError, KeyError, TypeError, ValueError):
            continue
    try:
        want_digest = parse_reference(ref).digest
    except InvalidReference:
        want_digest = None
    matches = [
        img
        for img in images
        if _same_ref(img.ref, ref) or (want_digest is not None and img.digest == want_digest)
    ]
    if not matches:
        raise NotFound(f"{ref}: no image of that name in {meta.root} (never run through alsd?)")
    img = matches[0]
    rec = meta.load(PROFILE_KIND, img.digest)
    if rec is None:
        raise NotFound(f"{ref}: no prefetch profile recorded for {img.digest} yet")
    _, profile = profile_from_record(rec)
    indexes: dict[str, LayerIndex] = {}
    for pos, desc in enumerate(img.manifest.layers):
        lrec = meta.load(LAYER, layer_key(img.ref, desc.digest))
        if lrec is None:
            continue
        try:
            indexes[desc.digest] = layer_from_record(lrec, img, pos).index
        except (AlsdError, KeyError, TypeError, ValueError, IndexError):
            continue
    return StoredProfile(img.ref, img, profile, indexes)
