"""Materialised layers: every fixture layer extracted into a directory equals the gzip tar.

The reference is the plain gzip tag's layer read with the standard library's tarfile (an
independent reader): names, types, content, modes (setuid included), owners, mtimes,
xattrs, symlink targets, hardlink identity; whiteouts must be char 0/0 devices and opaque
directories carry ``trusted.overlay.opaque`` as containers/storage makes them for a
rootful overlay. Needs root (chown, mknod, trusted xattrs), like the extractor itself.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from alsd.layers.materialize import LayerDirs, MaterializeError, layer_key
from alsd.oci import formats
from alsd.oci.estargz_writer import layer_annotations, write_estargz
from alsd.oci.layer_index import Chunk, LayerIndex, normalize_name
from tests.support.oci_layout import OciLayout
from tests.unit.oci.test_formats_fixtures import LAZY_TAGS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="extraction needs root")

HIDDEN = (".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json")


class BlobSource:
    """Chunks decoded and verified from a whole blob in memory."""

    def __init__(self, index: LayerIndex, blob: bytes) -> None:
        self.index = index
        self.blob = blob
        self.reads = 0

    async def read_chunk(self, node: int, chunk: Chunk) -> bytes:
        self.reads += 1
        return formats.decode_chunk(
            self.index.format, chunk, self.blob[chunk.blob_offset : chunk.fetch_end]
        )


@pytest.fixture(scope="module")
def layout(fixtures: Path) -> OciLayout:
    return OciLayout(fixtures / "images")


def build(dirs: LayerDirs, index: LayerIndex, blob: bytes) -> Path:
    asyncio.run(dirs.build(index, BlobSource(index, blob)))
    return dirs.tree(index.toc_digest)


def tree_entries(root: Path) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = os.lstat(p)
    return out


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {
        k: os.getxattr(path, k, follow_symlinks=False)
        for k in os.listxattr(path, follow_symlinks=False)
    }


def compare_with_tar(root: Path, tar_bytes: bytes, index: LayerIndex | None = None) -> None:
    """Assert that the tree under ``root`` is what extracting the tar for a rootful
    overlay lower gives (the layer as containers/storage would have it).

    mtimes: eStargz TOCs (and the tar stream ctr-remote rewrites) hold whole seconds, so
    the tree's mtime is within a second of the tar's; with ``index`` it must also be
    exactly the index's."""
    members: dict[str, tarfile.TarInfo] = {}
    contents: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:*") as tf:
        for m in tf.getmembers():
            name = normalize_name(m.name)
            members[name] = m
            if m.isreg() or m.islnk():
                f = tf.extractfile(m)
                assert f is not None
                contents[name] = f.read()
    have = tree_entries(root)
    want: dict[str, tarfile.TarInfo | None] = {}  # None: a whiteout
    opaque: set[str] = set()
    for name, m in members.items():
        parent, _, base = name.rpartition("/")
        if not name or name in HIDDEN:
            continue
        if base == ".wh..wh..opq":
            opaque.add(parent)
        elif base.startswith(".wh."):
            want[f"{parent}/{base[4:]}".lstrip("/")] = None
        else:
            want[name] = m
    for name in list(want):  # implicit parent directories
        parent = name.rpartition("/")[0]
        while parent:
            assert parent in want, f"{parent} missing from the tar"
            parent = parent.rpartition("/")[0]
    assert set(have) == set(want)
    root_member = members.get("")
    if root_member is not None:
        assert stat.S_IMODE(os.lstat(root).st_mode) == stat.S_IMODE(root_member.mode)
    for name, m in want.items():
        st = have[name]
        path = root / name
        if m is None:
            assert stat.S_ISCHR(st.st_mode), name
            assert st.st_rdev == 0, name
            continue
        assert st.st_uid == m.uid and st.st_gid == m.gid, name
        if m.islnk():
            target = normalize_name(m.linkname)
            assert st.st_ino == have[target].st_ino, name
            assert st.st_nlink >= 2, name
            continue
        if not m.issym():  # a symlink's mode is always 0777 on Linux
            assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(m.mode), name
        assert abs(st.st_mtime_ns - int(m.mtime * 1e9)) < 1_000_000_000, name
        if index is not None:
            node = index.find(name)
            assert node is not None, name
            assert st.st_mtime_ns == index.attr(node).mtime_ns, name
        want_x = {
            k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
            for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        if name in opaque:
            want_x["trusted.overlay.opaque"] = b"y"
        assert xattrs_of(path) == want_x, name
        if m.isreg():
            assert stat.S_ISREG(st.st_mode), name
            assert path.read_bytes() == contents[name], name
        elif m.isdir():
            assert stat.S_ISDIR(st.st_mode), name
        elif m.issym():
            assert stat.S_ISLNK(st.st_mode), name
            assert os.readlink(path) == m.linkname, name
        elif m.ischr() or m.isblk():
            assert stat.S_ISCHR(st.st_mode) == m.ischr(), name
            assert stat.S_ISBLK(st.st_mode) == m.isblk(), name
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (m.devmajor, m.devminor)
        elif m.isfifo():
            assert stat.S_ISFIFO(st.st_mode), name
        else:  # pragma: no cover
            raise AssertionError(f"{name}: unexpected tar member type {m.type!r}")


@pytest.mark.parametrize("tag", sorted(LAZY_TAGS))
def test_fixture_layers_extract_like_the_gzip_tar(
    layout: OciLayout, tag: str, tmp_path: Path
) -> None:
    gzip_layers = layout.image("gzip").layers
    layers = layout.image(tag).layers
    dirs = LayerDirs(tmp_path / "layers")
    dirs.open()
    for layer, plain in zip(layers, gzip_layers, strict=True):
        blob = layout.blob(layer.digest)
        index = formats.index_blob(blob, layer.annotations, layer.media_type)
        root = build(dirs, index, blob)
        compare_with_tar(root, layout.blob(plain.digest), index)
        rec = dirs.check(index.toc_digest, index)
        assert rec.toc_digest == index.toc_digest
    assert not list(dirs.tmp.iterdir())


def test_fixture_details(layout: OciLayout, tmp_path: Path) -> None:
    """The fixture's notable entries, named (so a comparison that skips them fails)."""
    dirs = LayerDirs(tmp_path / "layers")
    dirs.open()
    img = layout.image("zstdchunked-podman54")
    roots = []
    for layer in img.layers:
        blob = layout.blob(layer.digest)
        index = formats.index_blob(blob, layer.annotations, layer.media_type)
        roots.append(build(dirs, index, blob))
    one, two = roots
    assert (one / "data/small.txt").read_bytes() == b"hello from a fixture\n"
    assert os.getxattr(one / "data/small.txt", "user.fixture") == b"value"
    assert os.lstat(one / "data/hard").st_ino == os.lstat(one / "data/small.txt").st_ino
    assert os.readlink(one / "data/link") == "small.txt"
    assert stat.S_IMODE(os.lstat(one / "data/suid.sh").st_mode) == 0o4755
    wh = os.lstat(two / "gone/a")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(two / "opq", "trusted.overlay.opaque") == b"y"
    assert "user.overlay.opaque" not in os.listxattr(two / "opq")
    assert sorted(os.listdir(two / "opq")) == ["z"]


def make_tar(add: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add(tf)
    return buf.getvalue()


def member(name: str, kind: bytes, **kw: object) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    m.mtime = 1_600_000_000
    for k, v in kw.items():
        setattr(m, k, v)
    return m


# vfs_cap_data revision 2, effective, permitted = CAP_NET_BIND_SERVICE (bit 10)
CAP_NET_BIND = "\x01\x00\x00\x02" + "\x00\x04\x00\x00" + "\x00" * 12


def special_tar() -> bytes:
    def add(tf: tarfile.TarFile) -> None:
        tf.addfile(member("dev", tarfile.DIRTYPE, mode=0o1777, uid=7, gid=8))
        tf.addfile(member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666))
        tf.addfile(member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660))
        tf.addfile(member("dev/pipe", tarfile.FIFOTYPE, mode=0o620, uid=3, gid=4))
        tf.addfile(member("ro", tarfile.DIRTYPE, mode=0o555, mtime=1_500_000_000))
        tf.addfile(member("ro/sub", tarfile.DIRTYPE, mode=0o500, mtime=1_400_000_000))
        data = b"x" * 200_000
        f = member("ro/sub/f", tarfile.REGTYPE, size=len(data), mode=0o6711)
        tf.addfile(f, io.BytesIO(data))
        tf.addfile(member("ro/hl", tarfile.LNKTYPE, linkname="ro/sub/f"))
        tf.addfile(
            member(
                "ro/cap",
                tarfile.REGTYPE,
                size=1,
                uid=1000,
                gid=1000,
                pax_headers={"SCHILY.xattr.security.capability": CAP_NET_BIND},
            ),
            io.BytesIO(b"c"),
        )
        tf.addfile(member("abs", tarfile.SYMTYPE, linkname="/etc/passwd", uid=1234, gid=1234))
        tf.addfile(member("up", tarfile.SYMTYPE, linkname="../../../../outside"))

    return make_tar(add)


def estargz_index(tar: bytes) -> tuple[LayerIndex, bytes]:
    res = write_estargz(tar, chunk_size=65536)
    return formats.index_blob(res.blob, layer_annotations(res)), res.blob


def test_devices_fifos_modes_and_links(tmp_path: Path) -> None:
    tar = special_tar()
    index, blob = estargz_index(tar)
    dirs = LayerDirs(tmp_path / "layers")
    dirs.open()
    passwd_before = os.lstat("/etc/passwd")
    root = build(dirs, index, blob)
    compare_with_tar(root, tar, index)
    # The layer's absolute symlink was changed (owner, time), its target never.
    passwd_after = os.lstat("/etc/passwd")
    assert (passwd_after.st_uid, passwd_after.st_mtime_ns) == (
        passwd_before.st_uid,
        passwd_before.st_mtime_ns,
    )
    assert os.lstat(root / "abs").st_uid == 1234
    # chown clears setuid/setgid and capabilities: both were applied after it.
    assert stat.S_IMODE(os.lstat(root / "ro/sub/f").st_mode) == 0o6711
    assert "security.capability" in os.listxattr(root / "ro/cap")
    assert not (tmp_path / "outside").exists()


def test_the_layer_directory_is_private(tmp_path: Path) -> None:
    index, blob = estargz_index(special_tar())
    dirs = LayerDirs(tmp_path / "layers")
    dirs.open()
    build(dirs, index, blob)
    assert stat.S_IMODE(os.lstat(dirs.root).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(dirs.layer_dir(index.toc_digest)).st_mode) == 0o700


class FailingSource(BlobSource):
    def __init__(self, index: LayerIndex, blob: bytes, fail_after: int) -> None:
        super().__init__(index, blob)
        self.fail_after = fail_after

    async def read_chunk(self, node: int, chunk: Chunk) -> bytes:
        if self.reads >= self.fail_after:
            raise OSError(5, "chunk unavailable")
        return await super().read_chunk(node, chunk)


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    index, blob = estargz_index(special_tar())
    dirs = LayerDirs(tmp_path / "layers")
    dirs.open()
    with pytest.raises(OSError, match="chunk unavailable"):
        asyncio.run(dirs.build(index, FailingSource(index, blob, fail_after=1)))
    assert not dirs.layer_dir(index.toc_digest).exists()
    assert not list(dirs.tmp.iterdir())


def test_a_cancelled_build_stops_and_leaves_nothing(tmp_path: Path) -> None:
    index, blob = estargz_index(special_tar())
    dirs = LayerDirs(tmp_path / "layers")
    dirs.open()
    gate = asyncio.Event()

    class Slow(BlobSource):
        async def read_chunk(self, node: int, chunk: Chunk) -> bytes:
            gate.set()
            await asyncio.sleep(3600)
            raise AssertionError("not reached")

    async def run() -> None:
        task = asyncio.create_task(dirs.build(index, Slow(index, blob)))
        await gate.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(run(), 30))
    assert not dirs.layer_dir(index.toc_digest).exists()
    assert not list(dirs.tmp.iterdir())


def test_a_wrong_sized_chunk_is_refused(tmp_path: Path) -> None:
    index, blob = estargz_index(special_tar())
    dirs = LayerDirs(tmp_path / "layers")
    dirs.open()

    class Short(BlobSource):
        async def read_chunk(self, node: int, chunk: Chunk) -> bytes:
            return (await super().read_chunk(node, chunk))[:-1]

    with pytest.raises(MaterializeError, match="bytes, expected"):
        asyncio.run(dirs.build(index, Short(index, blob)))
    assert not dirs.layer_dir(index.toc_digest).exists()


def built(tmp_path: Path) -> tuple[LayerDirs, LayerIndex, Path]:
    index, blob = estargz_index(special_tar())
    dirs = LayerDirs(tmp_path / "layers")
    dirs.open()
    return dirs, index, build(dirs, index, blob)


def test_check_passes_on_a_good_tree_and_open_lists_it(tmp_path: Path) -> None:
    dirs, index, _root = built(tmp_path)
    rec = dirs.check(index.toc_digest, index)
    assert rec.files == 2 and rec.file_bytes == 200_001
    assert dirs.open() == {layer_key(index.toc_digest): rec}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "dev/null").unlink(), "tree holds"),
        (lambda root: os.truncate(root / "ro/cap", 0), "tree holds"),
        (lambda root: (root / "extra").write_bytes(b""), "tree holds"),
        (lambda root: (root.parent / "record").write_bytes(b"junk"), "record"),
        (lambda root: (root.parent / "record").unlink(), "record unreadable"),
    ],
)
def test_check_fails_on_a_damaged_tree(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    dirs, index, root = built(tmp_path)
    damage(root)
    with pytest.raises(MaterializeError, match=message):
        dirs.check(index.toc_digest, index)


def test_check_refuses_a_record_of_another_index(tmp_path: Path) -> None:
    """A complete directory under another layer's name (a copy, a mix-up) is refused."""
    dirs, index, _root = built(tmp_path)
    other, _ = estargz_index(make_tar(lambda tf: tf.addfile(member("only", tarfile.DIRTYPE))))
    os.rename(dirs.layer_dir(index.toc_digest), dirs.layer_dir(other.toc_digest))
    with pytest.raises(MaterializeError, match="record names another layer"):
        dirs.check(other.toc_digest)


def test_open_removes_half_built_and_unrecorded_directories(tmp_path: Path) -> None:
    dirs, index, _root = built(tmp_path)
    half = dirs.tmp / f"{layer_key(index.toc_digest)}.dead"
    (half / "diff/sub").mkdir(parents=True)
    (half / "diff/sub").chmod(0o500)
    norecord = dirs.root / ("ab" * 32)
    (norecord / "diff").mkdir(parents=True)
    stray = dirs.root / "stray"
    stray.write_text("x")
    found = dirs.open()
    assert list(found) == [layer_key(index.toc_digest)]
    assert not half.exists() and not norecord.exists() and not stray.exists()
    assert not list(dirs.trash.iterdir())


def test_remove(tmp_path: Path) -> None:
    dirs, index, _root = built(tmp_path)
    assert dirs.remove(index.toc_digest)
    assert not dirs.layer_dir(index.toc_digest).exists()
    assert not dirs.remove(index.toc_digest)
    assert dirs.open() == {}


def test_rebuild_replaces_the_old_directory(tmp_path: Path) -> None:
    dirs, index, root = built(tmp_path)
    os.truncate(root / "ro/cap", 0)
    _, blob = estargz_index(special_tar())
    build(dirs, index, blob)
    dirs.check(index.toc_digest, index)
    assert (root / "ro/cap").read_bytes() == b"c"


def test_layer_key() -> None:
    assert layer_key("sha256:" + "a" * 64) == "a" * 64
    other = layer_key("sha512:abc")
    assert len(other) == 64 and other != layer_key("sha512:abd")
