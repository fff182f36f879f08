"""Read the fixture OCI image layout: tags -> manifest -> config and layer blobs.

Small and dependency-free on purpose, so every test module can use it::

    layout = OciLayout(fixtures / "images")
    layout.tags()                      # ["gzip", "esgz", ...]
    img = layout.image("esgz")         # Image(manifest=..., config=..., layers=[Layer...])
    for layer in img.layers:
        layer.digest, layer.media_type, layer.size, layer.annotations
        data = layout.blob(layer.digest)   # bytes, digest checked

Only single-platform manifests are handled (that is all the fixtures hold).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    tag: str
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    layers: list[Layer]


class OciLayout:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._index: dict[str, Any] = json.loads((self.root / "index.json").read_text())

    def tags(self) -> list[str]:
        """Every ``org.opencontainers.image.ref.name`` in index.json, in file order."""
        return [
            m["annotations"]["org.opencontainers.image.ref.name"]
            for m in self._index["manifests"]
            if "org.opencontainers.image.ref.name" in m.get("annotations", {})
        ]

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return self.root / "blobs" / algo / hexd

    def blob(self, digest: str) -> bytes:
        """The blob's bytes; AssertionError if they do not hash to ``digest``."""
        data = self.blob_path(digest).read_bytes()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        assert actual == digest, f"fixture blob {digest} hashes to {actual}"
        return data

    def image(self, tag: str) -> Image:
        for m in self._index["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                manifest = json.loads(self.blob(m["digest"]))
                layers = [
                    Layer(
                        digest=d["digest"],
                        media_type=d["mediaType"],
                        size=d["size"],
                        annotations=dict(d.get("annotations", {})),
                    )
                    for d in manifest["layers"]
                ]
                return Image(tag, m["digest"], manifest, manifest["config"]["digest"], layers)
        raise KeyError(f"tag {tag!r} not in {self.root / 'index.json'}")
