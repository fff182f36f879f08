"""podman runs containers through alsd: real podman, real registry, real alsd FUSE mount.

Every test runs on both generations of the ALS protocol (spec.md §1.2, §1.11): the host's
podman and the other Debian release's podman from the chroot that ``.ci/build-chroot``
builds. The test ids say which protocol each run exercises: ``blob-digest`` (podman < 5.1
names layer directories by the compressed blob digest) or ``toc-digest`` (podman >= 5.1
names them by the TOC digest and asks only about layers with a TOC annotation it knows).

podman only ever talks to the registry through :class:`CountingProxy`, a plain TCP proxy
that counts the bytes the registry sends (and can hold blob requests, to kill alsd while a
pull waits on it). alsd reaches the registry through the same proxy, so the count is what
the registry sent to both.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.daemon import REPO, AlsdProcess, running_alsd, start_alsd, write_config
from tests.support.podman import OTHER_ROOT_ENV, other_root_unavailable, parse_version, protocol_for

if TYPE_CHECKING:
    from tests.support.podman import PodmanEnv, PodmanFactory
    from tests.support.registry import RegistryServer

pytest_plugins = ["tests.support.podman", "tests.support.registry"]

pytestmark = [pytest.mark.podman, pytest.mark.fuse, pytest.mark.registry, pytest.mark.slow]

EXPECTED = "hello from a fixture"
LAZY_TAGS = ["esgz", "esgz-noopt", "zstdchunked-podman43", "zstdchunked-podman54",
             "zstdchunked-stargz", "converted"]  # fmt: skip
# Annotations containers/image >= 5.31 takes a TOC digest from (spec.md §1.10); a layer
# with neither is never offered to the ALS by podman >= 5.1.
TOC_ANNOTATIONS = (
    "containerd.io/snapshot/stargz/toc.digest",
    "io.github.containers.zstd-chunked.manifest-checksum",
)
ALS_WARNING = "Additional Layer Store"
# A pull that waits on a FUSE lookup has no timeout in containers/storage (spec.md §1.9):
# this bound turns "hangs forever" into a test failure.
HANG_TIMEOUT_S = 180.0
DEADLINE_S = 60.0
# The alsd settings of these tests: the defaults (landmark prefetch on), except that
# nothing is fetched in the background, so that the bytes counted are those the
# container's run (and the prioritised files) needed, not the rest of the image, and that
# the read-ahead after a miss is 64 KiB instead of 512 KiB: the fixture images are 1.4 MB,
# and with the default the read-ahead alone would fetch nearly all of them.
ALSD_SETTINGS: dict[str, Any] = {"prefetch.background": False, "fetch.readahead_bytes": 65536}


# ------------------------------------------------------------------ generations


def _host_protocol() -> str | None:
    try:
        out = subprocess.run(
            ["podman", "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return protocol_for(parse_version(out))


def _generation_params() -> list[Any]:
    host = _host_protocol()
    other = {"blob-digest": "toc-digest", "toc-digest": "blob-digest"}.get(host or "")
    return [
        pytest.param("host", id=f"host-{host or 'unknown'}"),
        pytest.param("other", id=f"other-{other or 'unknown'}"),
    ]


@pytest.fixture(params=_generation_params())
def generation(request: pytest.FixtureRequest) -> str:
    gen: str = request.param
    if gen == "other":
        reason = other_root_unavailable()
        if reason is not None:
            pytest.skip(reason)
    return gen


# ------------------------------------------------------------------ counting proxy

_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n")
_RANGE_HEADER = re.compile(rb"\r\nRange: *([^\r]*)\r\n", re.I)


class CountingProxy:
    """A TCP proxy in front of a registry, counting the bytes the registry sends back.

    Bytes are attributed to the path of the last request line seen on the connection
    (HTTP/1.1 without pipelining answers requests in order). ``hold_blobs()`` makes GETs
    of ``/blobs/`` wait until ``release()``; ``held`` counts the requests waiting.
    Threads, not asyncio: podman and alsd are subprocesses, the test itself is sync.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.by_path: dict[str, int] = defaultdict(int)
        self.total = 0
        self.held = 0
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range header
        self._gate = threading.Event()
        self._gate.set()
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def snapshot(self) -> tuple[int, dict[str, int]]:
        with self._lock:
            return self.total, dict(self.by_path)

    def blob_bytes(self, digest: str, since: dict[str, int] | None = None) -> int:
        _, now = self.snapshot()
        base = since or {}
        return sum(n - base.get(p, 0) for p, n in now.items() if f"/blobs/{digest}" in p)

    def whole_blob_gets(self, digests: list[str]) -> list[str]:
        """Paths of GETs of these blobs that asked for the whole blob (no Range)."""
        with self._lock:
            reqs = list(self.requests)
        return [p for m, p, r in reqs if m == "GET" and r is None and any(d in p for d in digests)]

    def hold_blobs(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def close(self) -> None:
        self._closed.set()
        self._gate.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, up]
            path = ["?"]
            threading.Thread(target=self._to_upstream, args=(client, up, path), daemon=True).start()
            threading.Thread(target=self._to_client, args=(up, client, path), daemon=True).start()

    def _to_upstream(self, client: socket.socket, up: socket.socket, path: list[str]) -> None:
        try:
            while data := client.recv(65536):
                m = _REQUEST_LINE.match(data)
                if m is not None:
                    if m[1] == b"GET" and b"/blobs/" in m[2] and not self._gate.is_set():
                        with self._lock:
                            self.held += 1
                        self._gate.wait()
                        with self._lock:
                            self.held -= 1
                    path[0] = m[2].decode(errors="replace")
                    rng = _RANGE_HEADER.search(data)
                    with self._lock:
                        self.requests.append(
                            (m[1].decode(), path[0], rng[1].decode() if rng else None)
                        )
                up.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_WR)

    def _to_client(self, up: socket.socket, client: socket.socket, path: list[str]) -> None:
        try:
            while data := up.recv(65536):
                with self._lock:
                    self.total += len(data)
                    self.by_path[path[0]] += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)


# ------------------------------------------------------------------ helpers


def poll(what: str, check: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def als_links(penv: PodmanEnv) -> list[str]:
    """Targets of podman's layer ``diff`` entries that are symlinks (ALS layers)."""
    overlay = penv.graphroot / "overlay"
    if not overlay.is_dir():
        return []
    diffs = (overlay / d / "diff" for d in os.listdir(overlay) if d != "l")
    return sorted(os.readlink(p) for p in diffs if p.is_symlink())


def storage_layer_count(penv: PodmanEnv) -> int:
    doc = json.loads((penv.graphroot / "overlay-layers" / "layers.json").read_text())
    return len(doc)


def als_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ALS_WARNING in line]


def layer_key(layer: dict[str, Any], protocol: str) -> str | None:
    """The directory name podman of ``protocol`` asks the ALS for (None: it never asks)."""
    if protocol == "blob-digest":
        return str(layer["digest"])
    ann = layer.get("annotations", {})
    keys = [ann[a] for a in TOC_ANNOTATIONS if a in ann]
    return keys[0] if len(keys) == 1 else None


def ref_layers(alsd: AlsdProcess, ref: str) -> list[dict[str, Any]]:
    return [la for la in alsd.status()["layers"] if la["ref"] == ref]


def fetch_json(url: str) -> dict[str, Any]:
    req = urllib.request.Request(
        url,
        headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json, "
            "application/vnd.docker.distribution.manifest.v2+json"
        },
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def registry_image(registry: RegistryServer, repo: str, tag: str) -> dict[str, Any]:
    """The manifest (with ``config`` resolved to the config document) of repo:tag."""
    manifest = fetch_json(f"{registry.url}/v2/{repo}/manifests/{tag}")
    manifest["_config"] = fetch_json(
        f"{registry.url}/v2/{repo}/blobs/{manifest['config']['digest']}"
    )
    return manifest


def upload_blob(registry: RegistryServer, repo: str, data: bytes) -> str:
    """Monolithic blob upload (POST, then PUT with the digest); returns the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        location = resp.headers["Location"]
    if location.startswith("/"):
        location = registry.url + location
    sep = "&" if "?" in location else "?"
    req = urllib.request.Request(
        f"{location}{sep}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    urllib.request.urlopen(req, timeout=300).close()
    return digest


def push_manifest(
    registry: RegistryServer, repo: str, tag: str, manifest: dict[str, Any], config: bytes
) -> None:
    """Upload ``config`` and PUT ``manifest`` (its layers must already be in ``repo``)."""
    digest = upload_blob(registry, repo, config)
    manifest = dict(manifest)
    manifest["config"] = dict(manifest["config"], digest=digest, size=len(config))
    body = json.dumps(manifest).encode()
    req = urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/{tag}",
        data=body,
        method="PUT",
        headers={"Content-Type": manifest["mediaType"]},
    )
    urllib.request.urlopen(req, timeout=30).close()


def saved_layer_digests(oci_dir: Path) -> list[str]:
    """Layer digests of a ``podman save --format oci-dir --uncompressed`` directory, each
    checked by hashing the saved file."""

    def blob(digest: str) -> Path:
        return oci_dir / "blobs" / digest.replace(":", "/")

    index = json.loads((oci_dir / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_bytes())
    digests: list[str] = [layer["digest"] for layer in manifest["layers"]]
    for d in digests:
        h = hashlib.sha256()
        with blob(d).open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert "sha256:" + h.hexdigest() == d, f"saved layer {d} hashes differently"
    return digests


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer, fixtures: Path) -> dict[str, str]:
    """tag -> "fx:tag" for every fixture tag, plus the shared-layer image "fx:shared"."""
    out = {}
    for tag in ["gzip", *[t for t in LAZY_TAGS if t != "converted"]]:
        registry.push_fixture(tag)
        out[tag] = f"fx:{tag}"
    # Image "shared": layer 1 of esgz (the same blob) under a different layer 2 (that of
    # esgz-noopt), so its first layer is shared with fx:esgz and its second is not.
    a = registry_image(registry, "fx", "esgz")
    b = registry_image(registry, "fx", "esgz-noopt")
    config = dict(a["_config"])
    config["rootfs"] = {
        "type": "layers",
        "diff_ids": [a["_config"]["rootfs"]["diff_ids"][0], b["_config"]["rootfs"]["diff_ids"][1]],
    }
    manifest = {k: v for k, v in a.items() if k != "_config"}
    manifest["layers"] = [a["layers"][0], b["layers"][1]]
    push_manifest(registry, "fx", "shared", manifest, json.dumps(config).encode())
    out["shared"] = "fx:shared"
    return out


@pytest.fixture(scope="module")
def converted(registry: RegistryServer, pushed: dict[str, str], tmp_path_factory: Any) -> str:
    """The gzip tag converted by ``alsd convert``, as "fx:converted"."""
    alsd_convert(registry, tmp_path_factory.mktemp("convert"), "fx:gzip", "fx:converted")
    return "fx:converted"


def alsd_convert(registry: RegistryServer, work: Path, src: str, dst: str) -> None:
    """``alsd convert`` SRC DST (repo:tag in ``registry``) with a test-owned alsd.toml."""
    empty_auth = work / "auth.json"
    empty_auth.write_text('{"auths": {}}')
    # convert takes its registry settings from an alsd.toml, never the machine's.
    config = write_config(
        work / "alsd.toml",
        mountpoint=work / "unused-mnt",
        state_dir=work / "unused-state",
        control_socket=work / "unused.sock",
        registries_conf=registry.write_registries_conf(work / "registries.conf"),
        auth_file=empty_auth,
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "alsd", "convert", "--config", str(config),
           f"{registry.address}/{src}", f"{registry.address}/{dst}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-4000:]}"


DEBIAN_PYTHON = "/usr/bin/python3"  # python3-minimal's, not the interpreter running pytest
PYTHON_HELLO = "hello from Debian's Python"


def _add_dereferenced(tf: tarfile.TarFile, path: str) -> None:
    """Add file ``path`` at its canonical directory (merged /usr), content dereferenced."""
    arc = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    info = tf.gettarinfo(os.path.realpath(path), arcname=arc.lstrip("/"))
    with open(path, "rb") as f:
        tf.addfile(info, f)


@pytest.fixture(scope="module")
def python_image(registry: RegistryServer, tmp_path_factory: Any) -> str:
    """A realistic image, "fx-python:esgz" (~100 MB), built from the Debian packages of this
    machine (python3.11's interpreter, the shared libraries it links, its standard
    library and dist-packages), pushed as gzip and converted by ``alsd convert``."""
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.skip(f"{DEBIAN_PYTHON} (Debian's python3-minimal) is not installed")
    work = tmp_path_factory.mktemp("python-image")
    probe = subprocess.run(
        [DEBIAN_PYTHON, "-c", "import sys, sysconfig; print(sys.executable); "
         "print(sysconfig.get_paths()['stdlib']); print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    exe, stdlib = os.path.realpath(probe[0]), probe[1]
    dist = "/usr/lib/python3/dist-packages"  # Debian's, shared by all python3 versions
    libs = re.findall(r"(/\S+) \(0x", subprocess.run(
        ["ldd", exe], capture_output=True, text=True, check=True).stdout)  # fmt: skip
    tar_path = work / "rootfs.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for top in ("bin", "lib", "lib64"):
            if os.path.islink("/" + top):
                link = tarfile.TarInfo(top)
                link.type, link.linkname = tarfile.SYMTYPE, os.readlink("/" + top)
                tf.addfile(link)
        for p in [exe, *libs]:
            _add_dereferenced(tf, p)
        for tree in (stdlib, dist):
            if os.path.isdir(tree):
                tf.add(tree, arcname=tree.lstrip("/"))
    layer = tar_path.read_bytes()
    compressed = gzip.compress(layer, compresslevel=6)
    layer_digest = upload_blob(registry, "fx-python", compressed)
    cmd = [exe, "-c", f"import sys; print({PYTHON_HELLO!r}, sys.version.split()[0])"]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": len(compressed)}],
    }  # fmt: skip
    push_manifest(registry, "fx-python", "gzip", manifest, json.dumps(config).encode())
    alsd_convert(registry, work, "fx-python:gzip", "fx-python:esgz")
    return "fx-python:esgz"


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[CountingProxy]:
    p = CountingProxy((registry.host, registry.port))
    try:
        yield p
    finally:
        p.close()


class Setup:
    """alsd and one podman, both reaching the registry through ``proxy``."""

    def __init__(
        self, podman_env: PodmanFactory, generation: str, proxy: CountingProxy, **alsd_kw: Any
    ) -> None:
        self.proxy = proxy
        self.work = podman_env.workdir(generation)
        regconf = self.work / "alsd-registries.conf"
        regconf.write_text(f'[[registry]]\nlocation = "{proxy.address}"\ninsecure = true\n')
        self.alsd_kw = {"registries_conf": regconf, "settings": ALSD_SETTINGS, **alsd_kw}
        self.alsd = start_alsd(self.work / "alsd", **self.alsd_kw)
        self.penv = podman_env(generation, als_mount=self.alsd.mountpoint)
        self.podman_env = podman_env

    def ref(self, repo_tag: str) -> str:
        return f"{self.proxy.address}/{repo_tag}"

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            return self.penv.run("--log-level=warn", *args, check=check, timeout=HANG_TIMEOUT_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- alsd log:\n{self.alsd.log_tail()}") from None

    def restart_alsd(self) -> None:
        self.alsd = start_alsd(self.work / "alsd", **self.alsd_kw)

    def close(self) -> None:
        self.alsd.cleanup()


@pytest.fixture
def setup(
    podman_env: PodmanFactory, generation: str, proxy: CountingProxy
) -> Iterator[Callable[..., Setup]]:
    made: list[Setup] = []

    def make(**alsd_kw: Any) -> Setup:
        s = Setup(podman_env, generation, proxy, **alsd_kw)
        made.append(s)
        return s

    try:
        yield make
    finally:
        # podman_env's teardown (system reset) runs after this and needs no ALS: its
        # layers only point into the mount, and an unmounted mountpoint is a plain dir.
        for s in made:
            s.close()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("tag", LAZY_TAGS)
def test_lazy_image_runs_through_alsd(
    setup: Callable[..., Setup],
    tag: str,
    pushed: dict[str, str],
    request: pytest.FixtureRequest,
    registry: RegistryServer,
) -> None:
    repo_tag = request.getfixturevalue("converted") if tag == "converted" else pushed[tag]
    s = setup()
    penv, alsd, proxy = s.penv, s.alsd, s.proxy
    ref = s.ref(repo_tag)
    image = registry_image(registry, *repo_tag.split(":"))
    layers = image["layers"]
    compressed = sum(int(la["size"]) for la in layers)
    keys = [layer_key(la, penv.protocol) for la in layers]
    print(f"podman {penv.version} ({penv.generation}) speaks the {penv.protocol} protocol")

    if None in keys:
        # podman >= 5.1 never offers a layer without a TOC annotation it knows to the ALS
        # (spec.md §1.10): zstdchunked-podman43 carries only the old io.containers.* keys.
        assert all(k is None for k in keys), keys
        pull = s.podman("pull", ref, check=False)
        assert not ref_layers(alsd, ref), "alsd was asked about a layer without a TOC digest"
        assert not als_links(penv)
        # And podman 5.4 cannot pull this image at all, ALS or not: decompressing the
        # 2020-layout blob yields the tar plus the TOC frame, whose digest is not the
        # config's DiffID (podman 4.3 wrote it). Same failure without any ALS:
        plain = s.podman_env(penv.generation).run("pull", ref, check=False, timeout=HANG_TIMEOUT_S)
        mismatch = "does not match config's DiffID"
        assert plain.returncode != 0 and mismatch in plain.stderr, plain.stderr
        assert pull.returncode != 0 and mismatch in pull.stderr, pull.stderr
        return

    pull = s.podman("pull", ref)
    assert not als_warnings(pull.stderr), pull.stderr

    # Served by alsd: podman's layer diffs are symlinks into the mount, /status lists them.
    mount_in_podman = penv.podman_path(alsd.mountpoint)
    b64 = base64.b64encode(ref.encode()).decode()
    expected_links = sorted(f"{mount_in_podman}/{b64}/{k}/diff" for k in keys if k)
    assert als_links(penv) == expected_links, alsd.log_tail()
    served = {la["digest"]: la for la in ref_layers(alsd, ref)}
    assert set(served) == {la["digest"] for la in layers}
    assert all(la["use_count"] >= 1 for la in served.values()), served

    run = s.podman("run", "--rm", ref)
    assert run.stdout.strip() == EXPECTED
    assert not als_warnings(run.stderr), run.stderr
    sent, by_path = proxy.snapshot()
    print(f"{tag}: registry sent {sent} bytes for a {compressed}-byte image")
    # Not "less than a quarter" (issue 6): 77% of this image is the static busybox that
    # the CMD executes, and executing it touches 25 of its 31 64-KiB chunks even with
    # readahead off (measured), so no lazy store can stay under a quarter here;
    # test_realistic_image_needs_less_than_a_quarter checks the quarter on a Python image.
    # What must hold here: nobody (neither podman nor alsd) downloaded a whole layer, and
    # not all of the image was sent.
    assert not proxy.whole_blob_gets([la["digest"] for la in layers]), proxy.requests
    assert sent < compressed, f"sent {sent} of {compressed} bytes: {by_path}"

    # Whiteouts and opaque directories, as the running container sees them.
    script = "test -e /gone/a && echo gone-a-present; ls -A /gone; echo --; ls -A /opq"
    out = s.podman("run", "--rm", ref, "sh", "-c", script).stdout.split()
    assert out == ["b", "--", "z"], out

    # podman save exports from alsd's blob (spec.md §1.7), decompressed: the saved layer
    # tars must hash to the image's diff_ids, and alsd's blob to the manifest digests.
    infos = [json.loads(alsd.layer_dir(ref, k).joinpath("info").read_text()) for k in keys if k]
    blob_read_before = alsd.status()["fuse"]["bytes_read"].get("blob", 0)
    saved = penv.dir / "saved"
    save_cmd = ("save", "--format", "oci-dir", "--uncompressed", "-o", penv.podman_path(saved), ref)
    if penv.protocol == "blob-digest" and any(i.get("diff-size") == 0 for i in infos):
        # Known limit (spec.md §1.6, config [layers] unknown_diff_size = "lazy-zero"): a
        # layer whose uncompressed size cannot be known without reading it all (the 2020
        # zstd:chunked layout has no size annotation and no tar-split) is announced with
        # diff-size 0; podman <= 5.0 runs it but cannot export it.
        save = s.podman(*save_cmd, check=False)
        assert save.returncode != 0, "podman save of a diff-size 0 layer worked after all"
        assert "alsd" not in save.stderr  # podman's own error; alsd logged the reason
        assert "podman save/push of this image will fail" in alsd.log()
    else:
        save = s.podman(*save_cmd)
        assert not als_warnings(save.stderr), save.stderr
        assert saved_layer_digests(saved) == image["_config"]["rootfs"]["diff_ids"]
        blob_read = alsd.status()["fuse"]["bytes_read"].get("blob", 0) - blob_read_before
        assert blob_read >= compressed, f"save read {blob_read} bytes of blob, not the layers"
    for la, key in zip(layers, keys, strict=True):
        assert key is not None
        data = alsd.layer_dir(ref, key).joinpath("blob").read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == la["digest"]

    rmi = s.podman("rmi", ref)
    assert not als_warnings(rmi.stderr), rmi.stderr
    assert all(la["use_count"] == 0 for la in ref_layers(alsd, ref)), alsd.status()
    assert not als_links(penv)


def test_realistic_image_needs_less_than_a_quarter(
    setup: Callable[..., Setup], python_image: str, registry: RegistryServer
) -> None:
    """A real interpreter starting from a ~100 MB image: podman pulls and runs it through
    alsd with less than a quarter of the image's compressed bytes sent by the registry."""
    s = setup()
    ref = s.ref(python_image)
    layers = registry_image(registry, *python_image.split(":"))["layers"]
    compressed = sum(int(la["size"]) for la in layers)
    run = s.podman("run", "--rm", ref)
    assert run.stdout.startswith(PYTHON_HELLO), run.stdout
    assert not als_warnings(run.stderr), run.stderr
    assert len(als_links(s.penv)) == 1, s.alsd.log_tail()
    sent, _ = s.proxy.snapshot()
    print(f"python image: registry sent {sent} bytes of {compressed} ({sent / compressed:.1%})")
    assert sent < compressed / 4, f"registry sent {sent} of {compressed} bytes"


def test_shared_layer_is_reused(
    setup: Callable[..., Setup], pushed: dict[str, str], registry: RegistryServer
) -> None:
    """fx:shared has fx:esgz's first layer: podman keeps one layer for both, and alsd
    fetches none of that layer's file contents again."""
    s = setup()
    penv, proxy = s.penv, s.proxy
    ref_a, ref_b = s.ref(pushed["esgz"]), s.ref(pushed["shared"])
    shared = registry_image(registry, "fx", "shared")["layers"][0]["digest"]

    assert s.podman("run", "--rm", ref_a).stdout.strip() == EXPECTED
    assert storage_layer_count(penv) == 2
    _, before = proxy.snapshot()
    run_b = s.podman("run", "--rm", ref_b)
    assert run_b.stdout.strip() == EXPECTED
    assert not als_warnings(run_b.stderr), run_b.stderr
    # Two images, three layers: the shared one is stored once (and served by alsd).
    assert storage_layer_count(penv) == 3
    assert len(als_links(penv)) == 3
    # alsd resolves (fx:shared, layer) anew, which may read the layer's footer and TOC
    # (3.8 KB here), but no file content: the container's reads hit the cached chunks.
    refetched = proxy.blob_bytes(shared, since=before)
    assert refetched < 16 * 1024, f"the shared layer was fetched again ({refetched} bytes)"


def test_gzip_image_pulls_normally(setup: Callable[..., Setup], pushed: dict[str, str]) -> None:
    s = setup()
    ref = s.ref(pushed["gzip"])
    run = s.podman("run", "--rm", ref)
    assert run.stdout.strip() == EXPECTED
    assert not als_warnings(run.stderr), run.stderr
    assert not als_links(s.penv)
    assert all(la["use_count"] == 0 for la in s.alsd.status()["layers"])


def test_killing_alsd_mid_pull_never_hangs_and_a_restart_recovers(
    setup: Callable[..., Setup], pushed: dict[str, str]
) -> None:
    s = setup()
    ref = s.ref(pushed["esgz"])
    s.proxy.hold_blobs()  # the TOC fetch alsd makes while podman waits in a lookup
    pull = subprocess.Popen(
        s.penv.command("--log-level=debug", "pull", ref),
        env=s.penv.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        poll("alsd to wait on a blob request during the pull", lambda: s.proxy.held > 0)
        assert pull.poll() is None
        s.alsd.kill()
        s.proxy.release()
        try:
            _out, err = pull.communicate(timeout=HANG_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError("podman pull hung after alsd was killed") from None
    finally:
        s.proxy.release()
        if pull.poll() is None:
            pull.kill()
            pull.wait()
    print(f"pull after SIGKILL: exit {pull.returncode}")
    if pull.returncode == 0:
        # Fell back: the lookup failed (ENOTCONN), which containers/storage treats as "not
        # in this store", so podman pulled the layers itself and the image works.
        assert not als_links(s.penv)
        assert s.penv.run("run", "--rm", ref).stdout.strip() == EXPECTED
        if s.penv.protocol == "toc-digest":
            # c/storage >= 1.54 says why at debug level; 1.43 (podman 4.3) says nothing.
            lines = [ln for ln in err.splitlines() if "failed to stat additional layer" in ln]
            assert lines and all("transport endpoint is not connected" in ln for ln in lines), err
    else:
        assert err.strip(), "the failed pull said nothing"
        assert re.search(
            r"(transport endpoint|additionallayerstore|additional layer|not connected)", err, re.I
        ), err
    s.penv.run("rmi", "-f", ref, check=False)  # whatever the pull left

    s.restart_alsd()
    run = s.podman("run", "--rm", ref)
    assert run.stdout.strip() == EXPECTED
    assert als_links(s.penv), "after the restart podman did not use alsd"


def test_auth_helper_hands_credentials_to_alsd(
    podman_env: PodmanFactory,
    generation: str,
    registry_htpasswd: RegistryServer,
    tmp_path: Path,
) -> None:
    """podman >= 5.2 hands the pull's credentials to ``additional-layer-store-auth-helper``;
    alsd has no other credentials for this registry, so only they let it serve the layers."""
    registry_htpasswd.push_fixture("esgz")
    ref = f"{registry_htpasswd.address}/fx:esgz"
    work = podman_env.workdir(generation)
    regconf = registry_htpasswd.write_registries_conf(work / "alsd-registries.conf")
    empty_auth = work / "alsd-auth.json"
    empty_auth.write_text('{"auths": {}}')
    with running_alsd(
        work / "alsd", registries_conf=regconf, auth_file=empty_auth, settings=ALSD_SETTINGS
    ) as alsd:
        helper = work / "auth-helper"
        relay = HelperRelay(work, alsd, REPO)
        # podman runs the helper in its own root: name it (and the FIFOs) as podman sees them.
        seen = (lambda p: p) if generation == "host" else _chroot_path
        helper.write_text(relay.script(podman_path=seen))
        helper.chmod(0o755)
        penv = podman_env(generation, als_mount=alsd.mountpoint, auth_helper=str(seen(helper)))
        if penv.version_tuple < (5, 2, 0):
            pytest.skip(f"podman {penv.version} has no additional-layer-store-auth-helper")
        registry_htpasswd.write_auth_json(penv.auth_file)
        with relay:
            run = penv.run("--log-level=warn", "run", "--rm", ref, timeout=HANG_TIMEOUT_S)
        assert run.stdout.strip() == EXPECTED
        assert relay.forwarded >= 1
        assert len(als_links(penv)) == 2, alsd.log_tail()
        assert all(la["use_count"] >= 1 for la in ref_layers(alsd, ref))


def _chroot_path(p: Path) -> Path:
    root = Path(os.environ[OTHER_ROOT_ENV]).resolve()
    return Path("/") / p.resolve().relative_to(root)


class HelperRelay:
    """Runs the real ``alsd auth-helper`` on the host for podman's helper program.

    The chroot's podman runs the helper inside the chroot, where neither Python nor alsd
    is installed: the helper there is a shell script that writes podman's JSON into a
    FIFO and waits for an answer on a second one; this relay reads it, pipes it into
    ``python -m alsd auth-helper --socket <control socket>`` and writes back its status.
    (For the host's podman the same script works unchanged.)
    """

    def __init__(self, work: Path, alsd: AlsdProcess, repo: Path) -> None:
        self.request = work / "helper-request.fifo"
        self.answer = work / "helper-answer.fifo"
        os.mkfifo(self.request)
        os.mkfifo(self.answer)
        self.alsd = alsd
        self.repo = repo
        self.forwarded = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def script(self, podman_path: Callable[[Path], Any]) -> str:
        return (
            "#!/bin/sh\n"
            f"cat > {podman_path(self.request)}\n"
            f"read rc < {podman_path(self.answer)}\n"
            'exit "$rc"\n'
        )

    def __enter__(self) -> HelperRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # Unblock a relay waiting in open() of the FIFO.
        with contextlib.suppress(OSError):
            fd = os.open(self.request, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        self._thread.join(timeout=30)
        assert not self.errors, self.errors

    def _serve(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(self.repo))
        while not self._stop.is_set():
            with open(self.request, "rb") as f:
                data = f.read()
            if self._stop.is_set():
                return
            r = subprocess.run(
                [sys.executable, "-m", "alsd", "auth-helper",
                 "--socket", str(self.alsd.control_socket)],
                input=data, capture_output=True, env=env, timeout=60, check=False,
            )  # fmt: skip
            if r.returncode == 0:
                self.forwarded += 1
            else:
                self.errors.append(r.stderr.decode(errors="replace"))
            with open(self.answer, "w") as f:
                f.write(f"{r.returncode}\n")


# ------------------------------------------------------------------ prefetch profiles


def alsd_cli(alsd: AlsdProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``alsd ARGS --config <that daemon's alsd.toml>``, seeing no credentials of the host."""
    empty_auth = alsd.workdir / "cli-auth.json"
    empty_auth.write_text('{"auths": {}}')
    env = dict(os.environ, PYTHONPATH=str(REPO), REGISTRY_AUTH_FILE=str(empty_auth))
    cmd = [sys.executable, "-m", "alsd", *args, "--config", str(alsd.config_path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_profile_recorded_pushed_and_prefetched_on_a_fresh_host(
    setup: Callable[..., Setup], python_image: str, registry: RegistryServer, generation: str
) -> None:
    """Run an unoptimised image once (alsd records what it reads), ``alsd profile push`` it
    (the registry has no referrers API: tag schema), then on a fresh alsd state and podman
    store ("another host") the next run finds the profile and prefetches its files."""
    # A repository of its own: the other tests of this module must not find a profile.
    repo_tag = f"fx-python-profile-{generation}:esgz"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
         f"docker://{registry.address}/{python_image}", f"docker://{registry.address}/{repo_tag}"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    first = setup()
    ref = first.ref(repo_tag)
    run = first.podman("run", "--rm", ref)
    assert run.stdout.startswith(PYTHON_HELLO), run.stdout
    (layer,) = ref_layers(first.alsd, ref)
    assert layer["profile"] == "none"  # nothing known yet
    first.alsd.stop()  # SIGTERM: the recording is merged and saved

    show = alsd_cli(first.alsd, "profile", "show", ref)
    assert show.returncode == 0, show.stderr
    doc = json.loads(show.stdout)
    (lp,) = doc["layers"]
    paths = [e["path"] for e in lp["entries"]]
    assert lp["digest"] == layer["digest"] and lp["compressed_bytes"] > 0
    assert any(p.endswith("/encodings/__init__.py") or "python3" in p for p in paths), paths
    push = alsd_cli(first.alsd, "profile", "push", ref)
    assert push.returncode == 0, push.stderr
    assert "(referrers tag schema)" in push.stdout, push.stdout

    second = setup()  # fresh alsd state and podman store
    run = second.podman("run", "--rm", ref)
    assert run.stdout.startswith(PYTHON_HELLO), run.stdout
    status = second.alsd.status()
    (layer2,) = ref_layers(second.alsd, ref)
    assert status["profiles"]["lookups_found"] == 1, status["profiles"]
    assert layer2["profile"] == "done", layer2
    assert layer2["profile_entries"] == len(paths)
    assert layer2["profile_bytes"] == lp["compressed_bytes"]
    assert layer2["bytes_fetched"] >= layer2["profile_bytes"]


# ------------------------------------------------------------------ materialised layers

# Background fetch on (the default), so that alsd holds every chunk soon after the pull
# and materialises the layers (developer-notes/materialize.md).
MATERIALIZE_SETTINGS: dict[str, Any] = {
    **ALSD_SETTINGS,
    "prefetch.background": True,
    "layers.materialize": True,
}
# podman's own entries in a container's upper directory (made at create or start), and
# the directories it writes them into (their mtimes are podman's, not the image's).
PODMAN_MADE = {"etc/hosts", "etc/hostname", "etc/resolv.conf", "run/.containerenv"}
PODMAN_WRITES_INTO = {"etc", "run"}


def wait_materialised(alsd: AlsdProcess, ref: str, count: int) -> list[dict[str, Any]]:
    def done() -> bool:
        layers = ref_layers(alsd, ref)
        return len(layers) == count and all(la["materialized"] == "yes" for la in layers)

    try:
        poll(f"the {count} layer(s) of {ref} to be materialised", done)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {ref_layers(alsd, ref)}\n{alsd.log_tail()}") from None
    return ref_layers(alsd, ref)


def realpath_in(penv: PodmanEnv, path: str) -> str:
    """``realpath`` of a path as podman sees it, resolved where podman runs."""
    prefix = [] if penv.chroot is None else ["chroot", str(penv.chroot)]
    cmd = [*prefix, "realpath", path]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def container_lowers(s: Setup, name: str) -> list[str]:
    """The container's lower directories, resolved (symlinks followed) as podman sees them."""
    out = s.podman("inspect", "--format", "{{.GraphDriver.Data.LowerDir}}", name).stdout
    return [realpath_in(s.penv, p) for p in out.strip().split(":") if p]


def tree_snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: type and mode, owner, size, mtime, link count,
    device number, xattrs, symlink target, content hash (lstat only, no link followed)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            xattrs = tuple(
                sorted(
                    (k, os.getxattr(p, k, follow_symlinks=False))
                    for k in os.listxattr(p, follow_symlinks=False)
                )
            )
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                        st.st_nlink, st.st_rdev, xattrs, extra)  # fmt: skip
    return out


def mounted_tree(s: Setup, name: str) -> dict[str, tuple[Any, ...]]:
    path = s.podman("mount", name).stdout.strip()
    try:
        return tree_snapshot(s.penv.host_path(path))
    finally:
        s.podman("umount", name)


@pytest.mark.parametrize("tag", ["esgz", "zstdchunked-podman54"])
def test_materialised_layers_serve_new_containers_from_local_directories(
    setup: Callable[..., Setup], pushed: dict[str, str], registry: RegistryServer, tag: str
) -> None:
    """Once alsd holds every chunk of the image, it extracts each layer into a directory
    under its state dir and answers ``diff`` as a symlink to it: a container created
    afterwards has no lower directory on the mount, its filesystem equals the gzip
    image's, and it keeps reading files while alsd is killed (SIGKILL) and restarted."""
    s = setup(settings=MATERIALIZE_SETTINGS)
    ref, gzip_ref = s.ref(pushed[tag]), s.ref(pushed["gzip"])
    n_layers = len(registry_image(registry, "fx", tag)["layers"])
    assert s.podman("run", "--rm", ref).stdout.strip() == EXPECTED
    layers = wait_materialised(s.alsd, ref, n_layers)
    assert all(la["local_bytes"] > 0 for la in layers), layers

    # No leak: other local users reach nothing of the local directories, even with every
    # directory above state_dir/layers open to them; in a container, the image's own
    # modes apply (data/small.txt is 0644).
    small = sorted(s.alsd.state_dir.glob("layers/*/diff/data/small.txt"))
    assert small, sorted(s.alsd.state_dir.glob("layers/*"))
    for d in (s.work, s.work / "alsd", s.alsd.state_dir):
        d.chmod(0o711)
    for cmd in (["ls", str(s.alsd.state_dir / "layers")], ["cat", str(small[0])]):
        r = subprocess.run(["runuser", "-u", "nobody", "--", *cmd], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (cmd, r.stderr)
    as_nobody = s.podman("run", "--rm", "--user", "65534:65534", ref, "cat", "/data/small.txt")
    assert as_nobody.stdout.strip() == EXPECTED

    s.podman("create", "--name", "after", ref, "sh", "-c", "sleep 600")
    mount_in_podman = s.penv.podman_path(s.alsd.mountpoint)
    state_in_podman = s.penv.podman_path(s.alsd.state_dir)
    lowers = container_lowers(s, "after")
    assert len(lowers) == n_layers, lowers
    for low in lowers:
        assert not low.startswith(mount_in_podman + "/"), f"{low} is on the FUSE mount"
        assert low.startswith(f"{state_in_podman}/layers/"), low

    # Attribute for attribute, byte for byte: the same container made from the gzip image
    # (pulled whole by podman). eStargz TOCs hold whole seconds (ctr-remote rounds the
    # tar's mtimes too), so there mtimes are compared to the second.
    s.podman("create", "--name", "plain", gzip_ref, "sh", "-c", "sleep 600")
    lazy, plain = mounted_tree(s, "after"), mounted_tree(s, "plain")
    assert set(lazy) == set(plain)
    whole_seconds = tag.startswith("esgz")
    for path in sorted(plain):
        if path in PODMAN_MADE:
            continue
        a, b = list(lazy[path]), list(plain[path])
        if stat.S_ISDIR(a[0]):
            a[3] = b[3] = 0  # a directory's st_size is its filesystem's, not the image's
        if path in PODMAN_WRITES_INTO:
            a[4] = b[4] = 0
        elif whole_seconds:
            assert abs(a[4] - b[4]) < 10**9, path
            a[4] = b[4] = 0
        assert a == b, f"{path}: {a} != {b}"
    assert lazy["data/hard"][5] == 2  # one inode, two names (hardlink kept)

    # SIGKILL alsd while the container reads every file over and over: no read fails. The
    # container logs to a directory of the host, since no podman command works while the
    # ALS mount is dead.
    out = s.work / "reader-out"
    out.mkdir()
    log_file = out / "log"
    script = ("i=0; while :; do for f in $(find / -xdev -type f); do "
              "cat \"$f\" > /dev/null || echo FAIL \"$f\" >> /out/log; done; i=$((i+1)); "
              "echo round $i >> /out/log; done")  # fmt: skip
    s.podman("rm", "after")
    s.podman("run", "-d", "--name", "reader", "-v", f"{s.penv.podman_path(out)}:/out", ref,
             "sh", "-c", script)  # fmt: skip

    def rounds() -> int:
        return log_file.read_text().count("round ") if log_file.exists() else 0

    poll("the reader's first round", lambda: rounds() >= 1)
    s.alsd.kill()
    before = rounds()
    poll("more rounds with alsd dead", lambda: rounds() >= before + 3)
    text = log_file.read_text()
    assert "FAIL" not in text, text[-2000:]
    print(f"{tag}: {rounds() - before} rounds of reading every file with alsd killed, 0 failed")
    # Restarted: the materialised layers are known from metadata and answered as
    # symlinks at once, without reading their blobs (no TOC, no chunk) again.
    _, before = s.proxy.snapshot()
    s.restart_alsd()  # podman itself needs the ALS mount back to run any command
    image = registry_image(registry, "fx", tag)
    for la in image["layers"]:
        key = layer_key(la, s.penv.protocol)
        assert key is not None
        target = os.readlink(s.alsd.layer_dir(ref, key) / "diff")
        assert target.startswith("../../") and target.endswith("/diff"), target
        assert (s.alsd.layer_dir(ref, key) / "diff" / "data").is_dir()
    assert all(s.proxy.blob_bytes(la["digest"], since=before) == 0 for la in image["layers"])
    assert all(la["materialized"] == "yes" for la in ref_layers(s.alsd, ref))
    s.podman("rm", "-f", "reader", "plain")
