"""A small in-memory registry WITH the OCI 1.1 referrers API, for tests only.

Stand-in: Debian's docker-registry (distribution 2.8) has no referrers API, and no other
registry that has one is packaged here; this serves just what the profile lookup and push
use: blob HEAD/GET and monolithic upload (POST + PUT ?digest=), manifest PUT/GET by tag
or digest, and ``GET /v2/NAME/referrers/DIGEST[?artifactType=T]`` listing the manifests
whose ``subject`` is DIGEST (with ``OCI-Filters-Applied``), and ``OCI-Subject`` on the
PUT of a manifest with a subject, as distribution spec 1.1 describes. Every request is
recorded in ``.requests`` as (method, path).
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class ReferrersRegistry:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}  # digest -> (body, media type)
        self.tags: dict[tuple[str, str], str] = {}  # (repo, tag) -> digest
        self.requests: list[tuple[str, str]] = []
        self.referrers_api = True
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(
                self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _route(self) -> tuple[str, str, str, dict[str, list[str]]]:
                u = urlsplit(self.path)
                owner.requests.append((self.command, u.path))
                parts = u.path.split("/")
                # /v2/<repo...>/<kind>/<obj>
                if len(parts) < 5 or parts[1] != "v2":
                    return "", "", "", {}
                if parts[-2] == "uploads" or (parts[-3:-1] == ["blobs", "uploads"]):
                    i = parts.index("uploads")
                    return (
                        "/".join(parts[2 : i - 1]),
                        "uploads",
                        "/".join(parts[i + 1 :]),
                        (parse_qs(u.query)),
                    )
                return "/".join(parts[2:-2]), parts[-2], parts[-1], parse_qs(u.query)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                repo, kind, obj, q = self._route()
                if kind == "blobs" and obj in owner.blobs:
                    data = owner.blobs[obj]
                    self._send(200, data, {"Docker-Content-Digest": obj})
                elif kind == "manifests":
                    digest = owner.tags.get((repo, obj), obj)
                    if digest not in owner.manifests:
                        self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                        return
                    body, mt = owner.manifests[digest]
                    self._send(200, body, {"Content-Type": mt, "Docker-Content-Digest": digest})
                elif kind == "referrers" and owner.referrers_api:
                    want = q.get("artifactType", [None])[0]
                    entries = []
                    for digest, (body, mt) in owner.manifests.items():
                        doc = json.loads(body)
                        if (doc.get("subject") or {}).get("digest") != obj:
                            continue
                        art = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
                        if want and art != want:
                            continue
                        e = {"mediaType": mt, "digest": digest, "size": len(body)}
                        if art:
                            e["artifactType"] = art
                        if doc.get("annotations"):
                            e["annotations"] = doc["annotations"]
                        entries.append(e)
                    index = {
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries,
                    }
                    headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
                    if want:
                        headers["OCI-Filters-Applied"] = "artifactType"
                    self._send(200, json.dumps(index).encode(), headers)
                else:
                    self._send(404, b"404 page not found\n")

            def do_POST(self) -> None:
                repo, kind, _, _ = self._route()
                self._body()
                if kind != "uploads":
                    self._send(404)
                    return
                loc = f"/v2/{repo}/blobs/uploads/{uuid.uuid4().hex}"
                self._send(202, headers={"Location": loc})

            def do_PUT(self) -> None:
                repo, kind, obj, q = self._route()
                body = self._body()
                digest = "sha256:" + hashlib.sha256(body).hexdigest()
                if kind == "uploads":
                    if q.get("digest", [""])[0] != digest:
                        self._send(400, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
                        return
                    owner.blobs[digest] = body
                    self._send(201, headers={"Location": f"/v2/{repo}/blobs/{digest}"})
                elif kind == "manifests":
                    mt = self.headers.get("Content-Type", "")
                    owner.manifests[digest] = (body, mt)
                    if not obj.startswith("sha256:"):
                        owner.tags[(repo, obj)] = digest
                    elif obj != digest:
                        self._send(400, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
                        return
                    headers = {"Docker-Content-Digest": digest}
                    subject = (json.loads(body).get("subject") or {}).get("digest")
                    if subject and owner.referrers_api:
                        headers["OCI-Subject"] = subject
                    self._send(201, headers=headers)
                else:
                    self._send(404)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def put_image(self, repo: str, tag: str, manifest: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        self.manifests[digest] = (manifest, media_type)
        self.tags[(repo, tag)] = digest
        return digest

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
