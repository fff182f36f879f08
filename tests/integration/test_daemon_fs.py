"""The daemon end to end: a real docker-registry, alsd in a subprocess, real syscalls.

For every lazy fixture tag, each layer seen through ``<mnt>/<b64 ref>/<digest>/diff`` must
equal the same layer of the ``gzip`` tag, extracted here with :mod:`tarfile` and put in the
overlay form (whiteouts as char 0/0, opaque markers as xattrs); ``info`` must be right in
both generations, ``blob`` must be the registry's blob, and the ``use``/rmdir protocol must
answer ENOENT while moving the count shown by /status.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.support.daemon import AlsdProcess, running_alsd
from tests.support.oci_layout import OciLayout
from tests.support.registry import RegistryServer, registry  # noqa: F401

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

LAZY_TAGS = [
    "esgz",
    "esgz-noopt",
    "zstdchunked-podman43",
    "zstdchunked-stargz",
    "zstdchunked-podman54",
]
# Annotations containers/image (>= 5.31) takes the TOC digest from (spec.md §1.10).
TOC_ANNOTATIONS = (
    "containerd.io/snapshot/stargz/toc.digest",
    "io.github.containers.zstd-chunked.manifest-checksum",
)
OPAQUE = {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"}

Entry = dict[str, Any]


# ------------------------------------------------------------------ expected trees


def _uncompressed(blob: bytes, media_type: str) -> bytes:
    if media_type.endswith("zstd"):
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True
        )
        return reader.read()
    out = bytearray()
    data = blob
    while data:  # eStargz is many concatenated gzip members
        d = zlib.decompressobj(zlib.MAX_WBITS | 16)
        out += d.decompress(data)
        data = d.unused_data
    return bytes(out)


def _overlay_tree(tar_bytes: bytes) -> dict[str, Entry]:
    """A layer tar as overlayfs sees it in a lower directory."""
    tree: dict[str, Entry] = {}
    members: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        contents: dict[str, bytes] = {}
        for m in tf:
            name = m.name.removeprefix("./").rstrip("/")
            if not name or name == ".":
                continue
            members[name] = m
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                contents[name] = f.read()
    links: dict[str, int] = {}
    for m in members.values():
        if m.islnk():
            target = m.linkname.removeprefix("./")
            links[target] = links.get(target, 1) + 1
    for name, m in members.items():
        parent, _, base = name.rpartition("/")
        for i in range(len(parent.split("/")) if parent else 0):
            implicit = "/".join(parent.split("/")[: i + 1])
            tree.setdefault(implicit, {"type": "dir", "xattrs": {}})
        if base == ".wh..wh..opq":
            tree.setdefault(parent, {"type": "dir", "xattrs": {}})
            tree[parent]["opaque"] = True
            continue
        if base.startswith(".wh."):
            target = f"{parent}/{base[4:]}" if parent else base[4:]
            tree[target] = {"type": "whiteout", "mode": 0, "uid": 0, "gid": 0, "rdev": 0}
            continue
        src = members[m.linkname.removeprefix("./")] if m.islnk() else m
        src_name = m.linkname.removeprefix("./") if m.islnk() else name
        xattrs = {
            k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
            for k, v in src.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        e: Entry = {"mode": src.mode & 0o7777, "uid": src.uid, "gid": src.gid, "xattrs": xattrs}
        if src.isdir():
            e["type"] = "dir"
            e["opaque"] = tree.get(name, {}).get("opaque", False)
        elif src.isreg():
            data = contents[src_name]
            e |= {
                "type": "reg",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "nlink": links.get(src_name, 1),
            }
        elif src.issym():
            e |= {"type": "symlink", "target": src.linkname}
        elif src.ischr() or src.isblk():
            e |= {
                "type": "chr" if src.ischr() else "blk",
                "rdev": os.makedev(src.devmajor, src.devminor),
            }
        elif src.isfifo():
            e["type"] = "fifo"
        tree[name] = e
    for e in tree.values():
        if e["type"] == "dir":
            e.setdefault("opaque", False)
            if e.pop("opaque"):
                e["xattrs"] = {**e.get("xattrs", {}), **OPAQUE}
            e.setdefault("xattrs", {})
    return tree


def _seen_tree(root: Path) -> dict[str, Entry]:
    """What the mount shows, with real syscalls only."""
    tree: dict[str, Entry] = {}

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        mode = st.st_mode
        xattrs = {
            n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)
        }
        e: Entry = {
            "mode": stat.S_IMODE(mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "xattrs": xattrs,
        }
        if stat.S_ISDIR(mode):
            e["type"] = "dir"
        elif stat.S_ISREG(mode):
            data = path.read_bytes()
            assert len(data) == st.st_size, rel
            e |= {
                "type": "reg",
                "size": st.st_size,
                "sha256": hashlib.sha256(data).hexdigest(),
                "nlink": st.st_nlink,
            }
        elif stat.S_ISLNK(mode):
            e |= {"type": "symlink", "target": os.readlink(path)}
            assert st.st_size == len(os.fsencode(e["target"])), rel
        elif stat.S_ISCHR(mode) and st.st_rdev == 0 and stat.S_IMODE(mode) == 0:
            e = {"type": "whiteout", "mode": 0, "uid": st.st_uid, "gid": st.st_gid, "rdev": 0}
            assert not xattrs
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            e |= {"type": "chr" if stat.S_ISCHR(mode) else "blk", "rdev": st.st_rdev}
        elif stat.S_ISFIFO(mode):
            e["type"] = "fifo"
        tree[rel] = e

    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            visit(p, str(p.relative_to(root)))
    return tree


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def layout(fixtures: Path) -> OciLayout:
    return OciLayout(fixtures / "images")


@pytest.fixture(scope="module")
def refs(registry: RegistryServer) -> dict[str, str]:  # noqa: F811
    return {tag: registry.push_fixture(tag) for tag in [*LAZY_TAGS, "gzip"]}


@pytest.fixture(scope="module")
def alsd(
    registry: RegistryServer,  # noqa: F811
    refs: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AlsdProcess]:
    work = tmp_path_factory.mktemp("alsd")
    conf = registry.write_registries_conf(work / "registries.conf")
    with running_alsd(work, registries_conf=conf) as p:
        yield p
    assert "Traceback" not in p.log(), p.log_tail()


@pytest.fixture(scope="module")
def gzip_trees(layout: OciLayout) -> list[dict[str, Entry]]:
    img = layout.image("gzip")
    return [
        _overlay_tree(_uncompressed(layout.blob(la.digest), la.media_type)) for la in img.layers
    ]


def _config(layout: OciLayout, tag: str) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(layout.blob(layout.image(tag).config_digest))
    return cfg


def _layer_status(alsd: AlsdProcess, ref: str, blob_digest: str) -> dict[str, Any]:
    for la in alsd.status()["layers"]:
        if la["ref"] == ref and la["digest"] == blob_digest:
            return dict(la)
    raise AssertionError(f"{ref} {blob_digest} not in /status")


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("tag", LAZY_TAGS)
def test_diff_equals_the_gzip_layer(
    tag: str,
    alsd: AlsdProcess,
    refs: dict[str, str],
    layout: OciLayout,
    gzip_trees: list[dict[str, Entry]],
) -> None:
    img = layout.image(tag)
    assert len(img.layers) == len(gzip_trees)
    for la, expected in zip(img.layers, gzip_trees, strict=True):
        seen = _seen_tree(alsd.layer_dir(refs[tag], la.digest) / "diff")
        assert sorted(seen) == sorted(expected)
        for path in expected:
            assert seen[path] == expected[path], path


def test_diff_details(alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout) -> None:
    """The fixture's special entries, spelled out (the comparison above is generic)."""
    l1, l2 = layout.image("esgz").layers
    d1 = alsd.layer_dir(refs["esgz"], l1.digest) / "diff"
    d2 = alsd.layer_dir(refs["esgz"], l2.digest) / "diff"
    small = os.lstat(d1 / "data/small.txt")
    assert (d1 / "data/small.txt").read_bytes() == b"hello from a fixture\n"
    assert os.getxattr(d1 / "data/small.txt", "user.fixture") == b"value"
    with pytest.raises(OSError) as exc:
        os.getxattr(d1 / "data/small.txt", "user.nothing")
    assert exc.value.errno == errno.ENODATA
    hard = os.lstat(d1 / "data/hard")
    assert hard.st_ino == small.st_ino and small.st_nlink == 2
    assert os.readlink(d1 / "data/link") == "small.txt"
    assert stat.S_IMODE(os.lstat(d1 / "data/suid.sh").st_mode) == 0o4755
    gone = os.lstat(d2 / "gone/a")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(d2 / "opq", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(d2 / "opq", "user.overlay.opaque") == b"y"
    for hidden in [".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"]:
        assert not (d1 / hidden).exists()
    # inode numbers are unique across the layers of the mount
    assert os.lstat(d1).st_ino != os.lstat(d2).st_ino
    assert os.lstat(d1 / "data").st_ino != os.lstat(d2 / "data").st_ino
    # layer content is read-only
    with pytest.raises(OSError) as exc:
        open(d1 / "data/small.txt", "r+b")  # noqa: SIM115
    assert exc.value.errno in (errno.EROFS, errno.EACCES)


@pytest.mark.parametrize("tag", LAZY_TAGS)
def test_info_both_generations_and_blob(
    tag: str, alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout
) -> None:
    img = layout.image(tag)
    diff_ids = _config(layout, tag)["rootfs"]["diff_ids"]
    compression = 4 if img.layers[0].media_type.endswith("zstd") else 2
    for i, la in enumerate(img.layers):
        blob = layout.blob(la.digest)
        exact = len(_uncompressed(blob, la.media_type))
        old_dir = alsd.layer_dir(refs[tag], la.digest)
        raw = (old_dir / "info").read_bytes()
        assert os.stat(old_dir / "info").st_size == len(raw)
        old = json.loads(raw)
        assert old["diff-digest"] == diff_ids[i]
        assert old["compressed-diff-digest"] == la.digest
        assert old["compressed-size"] == la.size
        assert old["compression"] == compression
        if tag == "zstdchunked-podman43":
            # No uncompressed-size annotation and no tar-split: unknowable without
            # reading the whole layer; the default ("lazy-zero") announces 0.
            assert old["diff-size"] in (exact, 0)
        else:
            assert old["diff-size"] == exact
        assert set(old) == {
            "diff-digest",
            "compressed-diff-digest",
            "compressed-size",
            "diff-size",
            "compression",
        }
        # blob: byte for byte the registry's blob
        assert os.stat(old_dir / "blob").st_size == la.size
        assert hashlib.sha256((old_dir / "blob").read_bytes()).hexdigest() == la.digest[7:]

        toc = next((la.annotations[k] for k in TOC_ANNOTATIONS if k in la.annotations), None)
        if toc is None:
            continue  # podman >= 5.1 never asks the store about this layer
        new_dir = alsd.layer_dir(refs[tag], toc)
        new = json.loads((new_dir / "info").read_bytes())
        assert new["toc-digest"] == toc
        assert new["flags"] == {"expected-layer-diffid": diff_ids[i]}
        assert new["compressed-diff-digest"] == la.digest
        assert new["compressed-size"] == la.size
        assert new["diff-size"] in (exact, -1)
        assert new["compression"] == compression
        assert "diff-digest" not in new
        # same layer, same inodes, whichever name it was reached by
        assert os.lstat(new_dir / "diff").st_ino == os.lstat(old_dir / "diff").st_ino


def test_use_and_release_protocol(
    alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout
) -> None:
    ref = refs["esgz"]
    la = layout.image("esgz").layers[0]
    d = alsd.layer_dir(ref, la.digest)
    assert (d / "diff").is_dir()
    before = _layer_status(alsd, ref, la.digest)["use_count"]
    assert not (d / "use").exists()  # LOOKUP use -> ENOENT
    with pytest.raises(FileNotFoundError):
        # what containers/storage does: os.Create(L + "/use")
        os.open(d / "use", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    assert _layer_status(alsd, ref, la.digest)["use_count"] == before + 1
    with pytest.raises(FileNotFoundError):
        os.rmdir(d)
    assert _layer_status(alsd, ref, la.digest)["use_count"] == before
    assert d.is_dir()
    # nothing else is writable
    for attempt in (
        lambda: os.mkdir(d / "x"),
        lambda: os.open(d / "x", os.O_CREAT | os.O_WRONLY),
        lambda: os.unlink(d / "info"),
    ):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def test_gzip_layers_are_not_here(
    alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout
) -> None:
    for la in layout.image("gzip").layers:
        d = alsd.layer_dir(refs["gzip"], la.digest)
        for name in ("diff", "info", "blob"):
            with pytest.raises(FileNotFoundError):
                os.stat(d / name)
        with pytest.raises(FileNotFoundError):  # the release of an unknown layer
            os.rmdir(d)


def test_unknown_names_are_not_here(alsd: AlsdProcess, refs: dict[str, str]) -> None:
    good = alsd.layer_dir(refs["esgz"], "sha256:" + "0" * 64)
    with pytest.raises(FileNotFoundError):
        os.stat(good / "diff")
    for bad in ["not-base64!", "Zm9vOg=="]:  # the latter decodes to "foo:", no reference
        with pytest.raises(FileNotFoundError):
            os.stat(alsd.mountpoint / bad)
    with pytest.raises(FileNotFoundError):
        os.stat(good.parent / "sha256:xyz")


def test_absent_names_in_diff_are_remembered_by_the_kernel(
    alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout
) -> None:
    # Absent names inside a layer are answered as negative entries the kernel caches:
    # the second stat of the same name must not reach alsd. Names outside diff/ (an
    # unresolved layer, "use") stay uncached errors, see the two tests above.
    diff = alsd.layer_dir(refs["esgz"], layout.image("esgz").layers[0].digest) / "diff"
    assert diff.is_dir()

    def counts() -> tuple[int, int]:
        fuse = alsd.status()["fuse"]
        return fuse["requests"].get("lookup", 0), fuse["negative_lookups"]

    lookups0, neg0 = counts()
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            os.stat(diff / "no-such-name.cpython-311.so")
    lookups1, neg1 = counts()
    assert neg1 == neg0 + 1
    assert lookups1 == lookups0 + 1
    assert "no-such-name.cpython-311.so" not in os.listdir(diff)


def test_other_users_can_neither_list_nor_read(
    alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout
) -> None:
    la = layout.image("esgz").layers[0]
    f = alsd.layer_dir(refs["esgz"], la.digest) / "diff" / "data" / "small.txt"
    assert f.read_bytes() == b"hello from a fixture\n"  # root can
    for cmd in (["ls", str(alsd.mountpoint)], ["cat", str(f)]):
        r = subprocess.run(["runuser", "-u", "nobody", "--", *cmd], capture_output=True, text=True)
        assert r.returncode != 0
        assert "Permission denied" in r.stderr


def test_status_and_metrics(alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout) -> None:
    la = layout.image("esgz").layers[0]
    (alsd.layer_dir(refs["esgz"], la.digest) / "diff" / "data" / "big.bin").read_bytes()
    s = _layer_status(alsd, refs["esgz"], la.digest)
    assert s["format"] == "estargz" and s["bytes_served"] >= 300_000
    doc = alsd.status()
    assert doc["mountpoint"] == str(alsd.mountpoint) and doc["uptime_s"] >= 0
    m = alsd.metrics()
    assert 'alsd_fuse_requests_total{op="lookup"}' in m
    assert "# TYPE alsd_layers gauge" in m
    r = subprocess.run(
        [*_alsd(), "status", "--socket", str(alsd.control_socket)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    assert f"IMAGE {refs['esgz']}" in r.stdout
    assert "LOCAL" in r.stdout and "[#" not in r.stdout  # no bar when not a terminal


def test_status_text_explains_itself(
    alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout
) -> None:
    """Per image its reference, per layer how much is local; totals in the demo's unit."""
    la = layout.image("esgz").layers[0]
    diff = alsd.layer_dir(refs["esgz"], la.digest) / "diff"
    sizes: dict[int, int] = {}
    for root, _, names in os.walk(diff):
        for n in names:
            st = os.lstat(os.path.join(root, n))
            if stat.S_ISREG(st.st_mode):
                sizes[st.st_ino] = st.st_size
                with open(os.path.join(root, n), "rb") as f:
                    f.read()  # every file read: all of the layer is local now
    # Readers get their chunks before the store has written them: wait for the writes.
    deadline = time.monotonic() + 30
    while _layer_status(alsd, refs["esgz"], la.digest)["local_bytes"] < sum(sizes.values()):
        assert time.monotonic() < deadline, "the chunk store writes did not finish"
        time.sleep(0.05)  # polling interval
    r = subprocess.run(
        [*_alsd(), "status", "--socket", str(alsd.control_socket)],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = alsd.status()
    s = _layer_status(alsd, refs["esgz"], la.digest)
    assert s["content_bytes"] == sum(sizes.values()) and s["local_bytes"] == s["content_bytes"]
    lines = r.stdout.splitlines()
    image = lines.index(f"IMAGE {refs['esgz']}")
    row = next(x for x in lines[image:] if x.split()[:1] == [la.digest[:19]])

    def binary(n: int) -> str:  # as the demo's summary prints sizes (MiB = 2**20 bytes)
        return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"

    assert f"100% of {binary(s['content_bytes'])}" in row
    fetched = next(x for x in lines if x.startswith("fetched "))
    assert fetched.startswith(f"fetched     {binary(doc['registry']['bytes'])} from registries")
    reads = next(x for x in lines if x.startswith("reads "))
    e = doc["engine"]
    assert (
        f"{e['reads']} file reads answered: {e['reads'] - e['reads_fetched']} from the local "
        f"cache, {e['reads_fetched']} had to fetch from the registry first"
    ) in reads
    assert e["reads_fetched"] >= 1
    podman = next(x for x in lines if x.startswith("podman "))
    assert "took layers into use" in podman and "released them" in podman


def test_auth_helper_hands_credentials_over(alsd: AlsdProcess) -> None:
    body = json.dumps({"127.0.0.1:1/x/y:latest": {"username": "u", "password": "p"}})
    r = subprocess.run(
        [*_alsd(), "auth-helper", "--socket", str(alsd.control_socket)],
        input=body,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*_alsd(), "auth-helper", "--socket", str(alsd.control_socket)],
        input="[not json",
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 1 and "400" in r.stderr


def _alsd() -> list[str]:
    import sys

    return [sys.executable, "-m", "alsd"]


def _env() -> dict[str, str]:
    repo = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": str(repo)}


def test_readdir_lists_dot_and_dotdot(
    alsd: AlsdProcess, refs: dict[str, str], layout: OciLayout
) -> None:
    """Like every Linux filesystem (and stargz-store): ``.`` and ``..`` in every directory,
    which overlayfs passes through for a directory only the lower layer has."""
    la = layout.image("esgz").layers[0]
    d = alsd.layer_dir(refs["esgz"], la.digest)
    (d / "diff").stat()
    for path in (alsd.mountpoint, d.parent, d, d / "diff", d / "diff" / "data"):
        r = subprocess.run(["ls", "-a", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        names = r.stdout.split()
        assert names[:2] == [".", ".."], (path, names)
        assert names.count(".") == 1 and names.count("..") == 1
    data = d / "diff" / "data"
    ino = {e.name: e.inode() for e in os.scandir(data)}
    assert ino["dir"] == os.lstat(data / "dir").st_ino
    listed = subprocess.run(
        ["ls", "-ai", str(data)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    by_name = dict(zip(listed[1::2], (int(i) for i in listed[0::2]), strict=True))
    assert by_name["."] == os.lstat(data).st_ino
    assert by_name[".."] == os.lstat(d / "diff").st_ino


def test_a_reference_longer_than_name_max_is_served(
    alsd: AlsdProcess,
    registry: RegistryServer,  # noqa: F811
    layout: OciLayout,
) -> None:
    """FUSE passes names up to 1024 bytes (not NAME_MAX, 255): a reference whose base64 is
    longer than 255 reaches alsd and is served, not refused by the kernel."""
    ref = registry.push_fixture("esgz", repo="fx/" + "a" * 190)
    name = alsd.layer_dir(ref, layout.image("esgz").layers[0].digest)
    assert len(name.parent.name) > 255
    r = subprocess.run(
        ["cat", str(name / "diff" / "data" / "small.txt")], capture_output=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello from a fixture\n"
