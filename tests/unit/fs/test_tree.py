"""alsd.fs.tree: names, inode numbering, attributes and lookup counts, without a kernel."""

from __future__ import annotations

import base64
import hashlib
import stat
from dataclasses import dataclass

import pytest

from alsd.errors import UnknownLayer
from alsd.fs.tree import ROOT_INODE, Kind, Tree, decode_ref_name, encode_ref_name
from alsd.oci.index_builder import build_index
from alsd.oci.layer_index import LayerFormat, LayerIndex

REF = "docker.io/library/ubuntu:latest"
REF_NAME = "ZG9ja2VyLmlvL2xpYnJhcnkvdWJ1bnR1OmxhdGVzdA=="  # spec.md §1.3
BLOB = "sha256:" + "a" * 64
TOC = "sha256:" + "c" * 64
T = "2024-01-01T00:00:00Z"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _index(blob_size: int = 4096) -> LayerIndex:
    entries = [
        {"name": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "modtime": T},
        {"name": "bin/", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "modtime": T},
        {
            "name": "bin/sh",
            "type": "reg",
            "mode": 0o4755,
            "uid": 1,
            "gid": 2,
            "size": 3,
            "modtime": T,
            "offset": 0,
            "digest": _digest(b"abc"),
            "chunkDigest": _digest(b"abc"),
        },
        {"name": "bin/hard", "type": "hardlink", "linkName": "bin/sh", "modtime": T},
        {"name": "bin/ln", "type": "symlink", "linkName": "sh", "mode": 0o777, "modtime": T},
        {
            "name": "dev/null",
            "type": "char",
            "mode": 0o666,
            "devMajor": 1,
            "devMinor": 3,
            "modtime": T,
        },
        {"name": "etc/.wh.gone", "type": "reg", "mode": 0o644, "size": 0, "modtime": T},
        {"name": "opq/.wh..wh..opq", "type": "reg", "mode": 0o644, "size": 0, "modtime": T},
        {
            "name": ".prefetch.landmark",
            "type": "reg",
            "size": 1,
            "offset": 100,
            "modtime": T,
            "digest": _digest(b"\0"),
            "chunkDigest": _digest(b"\0"),
        },
    ]
    return build_index(
        entries,
        format=LayerFormat.ESTARGZ,
        toc_digest=TOC,
        verified=True,
        blob_size=blob_size,
        payload_end=200,
    )


@dataclass
class FakeLayer:
    """Stands in for alsd.layers.manager.Layer: the tree only reads these fields."""

    ref: str
    blob_digest: str
    toc_digest: str
    index: LayerIndex
    layer_no: int
    info_old: bytes = b'{"old":1}'
    info_new: bytes = b'{"new":2}'
    diff_link: str | None = None


@pytest.fixture
def tree() -> Tree:
    return Tree(uid=0, gid=0, mtime_ns=5)


def test_ref_names() -> None:
    assert encode_ref_name(REF) == REF_NAME
    assert decode_ref_name(REF_NAME) == REF
    for bad in ["!!!", "ZG9ja2VyLmlv=", "Zm9vOg==", base64.b64encode(b"a b").decode(), ""]:
        with pytest.raises(UnknownLayer):
            decode_ref_name(bad)


def test_root_is_root_only(tree: Tree) -> None:
    a = tree.attr(ROOT_INODE)
    assert stat.S_ISDIR(a.mode) and stat.S_IMODE(a.mode) == 0o700
    assert (a.uid, a.gid) == (0, 0)


def test_lookup_layout_and_generations(tree: Tree) -> None:
    ref_ino = tree.lookup_ref(REF_NAME)
    assert tree.lookup_ref(REF_NAME) == ref_ino
    with pytest.raises(UnknownLayer):
        tree.lookup_digest(ref_ino, "sha256:short")
    with pytest.raises(UnknownLayer):
        tree.lookup_digest(ref_ino, "sha256:" + "A" * 64)
    old_dir = tree.lookup_digest(ref_ino, BLOB)
    new_dir = tree.lookup_digest(ref_ino, TOC)
    assert tree.layer_dir(old_dir) == (REF, BLOB)
    assert tree.readdir(ROOT_INODE) == [(REF_NAME, ref_ino)]
    assert tree.readdir(old_dir) == []  # not resolved yet
    layer = FakeLayer(REF, BLOB, TOC, _index(), layer_no=0)
    info_old = tree.lookup_in_layer_dir(old_dir, "info", layer)
    info_new = tree.lookup_in_layer_dir(new_dir, "info", layer)
    assert info_old != info_new
    assert tree.resolve(info_old).content() == b'{"old":1}'
    assert tree.resolve(info_new).content() == b'{"new":2}'
    assert tree.attr(info_old).size == len(b'{"old":1}')
    blob = tree.lookup_in_layer_dir(old_dir, "blob", layer)
    assert tree.attr(blob).size == 4096
    assert stat.S_IMODE(tree.attr(blob).mode) == 0o400
    diff = tree.lookup_in_layer_dir(old_dir, "diff", layer)
    assert tree.resolve(diff).kind is Kind.DIFF
    assert [n for n, _ in tree.readdir(old_dir)] == ["blob", "diff", "info"]
    with pytest.raises(UnknownLayer):
        tree.lookup_in_layer_dir(old_dir, "use", layer)
    other = FakeLayer(REF, "sha256:" + "e" * 64, "sha256:" + "f" * 64, _index(), layer_no=1)
    with pytest.raises(Exception, match="engine answered"):
        tree.lookup_in_layer_dir(old_dir, "diff", other)


def test_materialised_diff_is_a_new_symlink_inode(tree: Tree) -> None:
    """Once materialised, diff answers a symlink with its own inode number; the directory
    inode of before stays valid (mounts of earlier containers hold it)."""
    ref_ino = tree.lookup_ref(REF_NAME)
    old_dir = tree.lookup_digest(ref_ino, BLOB)
    new_dir = tree.lookup_digest(ref_ino, TOC)
    layer = FakeLayer(REF, BLOB, TOC, _index(), layer_no=0)
    diff_dir = tree.lookup_in_layer_dir(old_dir, "diff", layer)
    assert tree.layer_dirs_of(layer) == [old_dir, new_dir]
    layer.diff_link = "../../../state/layers/" + "a" * 64 + "/diff"
    link = tree.lookup_in_layer_dir(new_dir, "diff", layer)
    assert link != diff_dir
    a = tree.attr(link)
    assert stat.S_ISLNK(a.mode) and a.size == len(layer.diff_link) and a.nlink == 1
    assert tree.resolve(link).kind is Kind.DIFF_LINK
    assert dict(tree.readdir(new_dir))["diff"] == link
    assert tree.resolve(diff_dir).kind is Kind.DIFF  # still served for earlier mounts
    assert stat.S_ISDIR(tree.attr(diff_dir).mode)
    other = FakeLayer("docker.io/library/other:1", BLOB, TOC, _index(), layer_no=1)
    assert tree.layer_dirs_of(other) == []


def test_missing_generation_info_is_enoent(tree: Tree) -> None:
    ref_ino = tree.lookup_ref(REF_NAME)
    old_dir = tree.lookup_digest(ref_ino, BLOB)
    layer = FakeLayer(REF, BLOB, TOC, _index(), layer_no=0, info_old=b"")
    with pytest.raises(UnknownLayer):
        tree.lookup_in_layer_dir(old_dir, "info", layer)


def test_diff_tree_attributes_and_unique_inodes(tree: Tree) -> None:
    ref_ino = tree.lookup_ref(REF_NAME)
    d = tree.lookup_digest(ref_ino, BLOB)
    l0 = FakeLayer(REF, BLOB, TOC, _index(), layer_no=0)
    l1 = FakeLayer(REF, "sha256:" + "1" * 64, "sha256:" + "2" * 64, _index(), layer_no=1)
    d1 = tree.lookup_digest(ref_ino, l1.blob_digest)
    root0 = tree.lookup_in_layer_dir(d, "diff", l0)
    root1 = tree.lookup_in_layer_dir(d1, "diff", l1)
    assert root0 != root1
    assert [n for n, _ in tree.readdir(root0)] == ["bin", "dev", "etc", "opq"]
    listed = dict(tree.readdir(root0))
    assert list(tree.readdir(root0)[2:]) == [("etc", listed["etc"]), ("opq", listed["opq"])]
    assert tree.readdir(root0)[-1] == ("opq", listed["opq"])
    bin0 = tree.lookup_in_diff(root0, "bin")
    assert bin0 == listed["bin"]
    # A caller that already resolved the parent passes it instead of a second resolve.
    assert tree.lookup_in_diff(root0, "bin", parent=tree.resolve(root0)) == bin0
    with pytest.raises(UnknownLayer):
        tree.lookup_in_diff(root0, "bin", parent=tree.resolve(d))
    bin1 = tree.lookup_in_diff(root1, "bin")
    assert bin0 is not None and bin1 is not None and bin0 != bin1
    sh = tree.lookup_in_diff(bin0, "sh")
    hard = tree.lookup_in_diff(bin0, "hard")
    assert sh is not None and sh == hard
    a = tree.attr(sh)
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o4755
    assert (a.uid, a.gid, a.size, a.nlink) == (1, 2, 3, 2)
    ln = tree.lookup_in_diff(bin0, "ln")
    assert ln is not None and stat.S_ISLNK(tree.attr(ln).mode) and tree.attr(ln).size == 2
    dev = tree.lookup_in_diff(root0, "dev")
    assert dev is not None
    null = tree.lookup_in_diff(dev, "null")
    assert null is not None
    assert stat.S_ISCHR(tree.attr(null).mode) and tree.attr(null).rdev == (1 << 8) | 3
    etc = tree.lookup_in_diff(root0, "etc")
    assert etc is not None
    gone = tree.lookup_in_diff(etc, "gone")
    assert gone is not None
    wa = tree.attr(gone)
    assert wa.mode == stat.S_IFCHR and wa.rdev == 0 and wa.size == 0
    assert tree.lookup_in_diff(etc, ".wh.gone") is None
    assert tree.lookup_in_diff(root0, ".prefetch.landmark") is None
    assert tree.lookup_in_diff(root0, "nothing") is None
    # all inode numbers distinct from the store's own directories
    assert len({ROOT_INODE, ref_ino, d, d1, root0, root1, bin0, bin1, sh, dev, null}) == 11


def test_forget_frees_meta_nodes_and_layers(tree: Tree) -> None:
    ref_ino = tree.lookup_ref(REF_NAME)
    d = tree.lookup_digest(ref_ino, BLOB)
    layer = FakeLayer(REF, BLOB, TOC, _index(), layer_no=7)
    diff = tree.lookup_in_layer_dir(d, "diff", layer)
    child = tree.lookup_in_diff(diff, "bin")
    assert child is not None
    assert tree.layers() == [layer]
    tree.forget(child, 1)
    assert tree.layers() == [layer]
    tree.forget(diff, 1)
    assert tree.layers() == []
    with pytest.raises(UnknownLayer):
        tree.resolve(diff)
    tree.forget(d, 1)
    with pytest.raises(UnknownLayer):
        tree.resolve(d)
    tree.forget(ref_ino, 1)
    assert tree.readdir(ROOT_INODE) == []
    tree.forget(ROOT_INODE, 1)
    assert tree.resolve(ROOT_INODE).kind is Kind.ROOT
