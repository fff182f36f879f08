"""Prefetch profiles: document, merge, check against a layer index, OCI artifact."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alsd.errors import FormatError
from alsd.oci.estargz_writer import layer_annotations, write_estargz
from alsd.oci.formats import index_blob
from alsd.oci.layer_index import LayerIndex
from alsd.oci.manifest import OCI_INDEX, OCI_MANIFEST, parse_manifest, sha256_digest
from alsd.oci.profile import (
    ANNOTATION_CREATED,
    ARTIFACT_TYPE,
    EMPTY_DIGEST,
    EMPTY_MEDIA_TYPE,
    PROFILE_MEDIA_TYPE,
    LayerProfile,
    Profile,
    ProfileEntry,
    ProfileLimits,
    add_referrer,
    artifact_manifest,
    check_against_image,
    covered_bytes,
    covered_ranges,
    merge_profiles,
    parse_artifact_manifest,
    parse_profile,
    parse_referrers,
    profile_chunks,
    profile_referrers,
    referrer_descriptor,
    referrers_tag,
    serialize_profile,
)

L1, L2, L3 = ("sha256:" + c * 64 for c in "abc")
IMAGE = "sha256:" + "d" * 64


def doc(layers: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"mediaType": PROFILE_MEDIA_TYPE, "layers": layers, **extra}).encode()


def ent(path: str, offset: int = 0, length: int = 1) -> dict[str, Any]:
    return {"path": path, "offset": offset, "length": length}


def prof(*layers: tuple[str, list[tuple[str, int, int]]]) -> Profile:
    return Profile(tuple(LayerProfile(d, tuple(ProfileEntry(*e) for e in es)) for d, es in layers))


# ==================================================================== document


def test_parse_round_trip_and_normalised_paths() -> None:
    data = doc([{"digest": L1, "entries": [ent("./usr//bin/sh", 5, 10), ent("etc/passwd")]}])
    p = parse_profile(data)
    assert p == prof((L1, [("usr/bin/sh", 5, 10), ("etc/passwd", 0, 1)]))
    assert parse_profile(serialize_profile(p)) == p
    # Canonical: the same profile always serialises to the same bytes.
    assert serialize_profile(parse_profile(serialize_profile(p))) == serialize_profile(p)


def test_parse_keeps_first_entry_of_a_path() -> None:
    data = doc([{"digest": L1, "entries": [ent("a", 3, 4), ent("./a", 0, 100), ent("b")]}])
    assert parse_profile(data) == prof((L1, [("a", 3, 4), ("b", 0, 1)]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"layers": []}).encode(), "mediaType"),
        (json.dumps({"mediaType": "application/json", "layers": []}).encode(), "mediaType"),
        (doc([], extra=1), "unknown field"),
        (doc({"x": 1}), "'layers' must be a list"),  # type: ignore[arg-type]
        (doc(["x"]), "JSON object"),
        (doc([{"digest": "sha256:abc", "entries": []}]), "bad digest"),
        (doc([{"digest": "md5:" + "a" * 32, "entries": []}]), "bad digest"),
        (doc([{"digest": L1.upper(), "entries": []}]), "bad digest"),
        (doc([{"digest": L1}]), "'entries' must be a list"),
        (doc([{"digest": L1, "entries": [], "x": 1}]), "unknown field"),
        (doc([{"digest": L1, "entries": []}, {"digest": L1, "entries": []}]), "listed twice"),
        (doc([{"digest": L1, "entries": [ent("")]}]), "non-empty string"),
        (doc([{"digest": L1, "entries": [ent("../etc/passwd")]}]), "inside the layer"),
        (doc([{"digest": L1, "entries": [ent("./")]}]), "inside the layer"),
        (doc([{"digest": L1, "entries": [ent("a\x00b")]}]), "NUL"),
        (doc([{"digest": L1, "entries": [ent("a", -1)]}]), "'offset'"),
        (doc([{"digest": L1, "entries": [ent("a", 0, 0)]}]), "positive"),
        (doc([{"digest": L1, "entries": [ent("a", True)]}]), "'offset'"),
        (doc([{"digest": L1, "entries": [ent("a", 0, 1.5)]}]), "'length'"),  # type: ignore[arg-type]
        (doc([{"digest": L1, "entries": [{**ent("a"), "mode": 1}]}]), "unknown field"),
        (doc([{"digest": L1, "entries": [ent("a" * 5000)]}]), "longer than"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_parse_refuses_malformed(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_profile(data)


def test_parse_bounds() -> None:
    limits = ProfileLimits(max_bytes=10_000, max_layers=2, max_entries=3)
    huge = doc([{"digest": L1, "entries": [ent(f"f{i}") for i in range(1000)]}])
    with pytest.raises(FormatError, match="exceeds 10000 bytes"):
        parse_profile(huge, limits)
    many = doc([{"digest": L1, "entries": [ent(f"f{i}") for i in range(4)]}])
    with pytest.raises(FormatError, match="4 entries, at most 3"):
        parse_profile(many, limits)
    layers = doc([{"digest": d, "entries": []} for d in (L1, L2, L3)])
    with pytest.raises(FormatError, match="3 layers, at most 2"):
        parse_profile(layers, limits)
    assert parse_profile(doc([{"digest": L1, "entries": [ent("a")] * 3}]), limits)


# ==================================================================== merge

paths = st.sampled_from([f"f{i}" for i in range(12)])
entries = st.lists(
    st.builds(ProfileEntry, paths, st.integers(0, 100), st.integers(1, 100)), max_size=15
)
profiles = st.lists(
    st.builds(LayerProfile, st.sampled_from([L1, L2, L3]), entries.map(tuple)), max_size=4
).map(
    # One layer per digest, one entry per path, as the parser guarantees.
    lambda lps: merge_profiles(Profile(), Profile(tuple(lps)))
)


@settings(max_examples=200, deadline=None)
@given(profiles, profiles)
def test_merge_first_seen_order(a: Profile, b: Profile) -> None:
    m = merge_profiles(a, b)
    # Every path of either run is there once, and the first run's come first, unchanged.
    for lp in m.layers:
        got = [e.path for e in lp.entries]
        assert len(got) == len(set(got))
        first = a.layer(lp.digest)
        n = len(first.entries) if first else 0
        assert lp.entries[:n] == (first.entries if first else ())
        then = b.layer(lp.digest)
        want = set(got[:n]) | ({e.path for e in then.entries} if then else set())
        assert set(got) == want
        # The second run's new paths keep its order.
        if then is not None:
            new = [e.path for e in then.entries if e.path not in got[:n]]
            assert got[n:] == new
    assert [lp.digest for lp in m.layers] == list(
        dict.fromkeys([lp.digest for lp in (*a.layers, *b.layers)])
    )
    # Merging is idempotent and round-trips through the document.
    assert merge_profiles(m, b) == m
    assert parse_profile(serialize_profile(m)) == m


@settings(max_examples=100, deadline=None)
@given(profiles, profiles, st.integers(1, 5), st.integers(1, 3))
def test_merge_bounded(a: Profile, b: Profile, max_entries: int, max_layers: int) -> None:
    limits = ProfileLimits(max_entries=max_entries, max_layers=max_layers)
    m = merge_profiles(a, b, limits)
    assert len(m.layers) <= max_layers
    assert all(len(lp.entries) <= max_entries for lp in m.layers)
    full = merge_profiles(a, b)
    for lp in m.layers:
        # What is kept is the head of the unbounded merge.
        whole = full.layer(lp.digest)
        assert whole is not None and whole.entries[: len(lp.entries)] == lp.entries


# ==================================================================== against an index


def make_layer(files: dict[str, bytes], chunk_size: int = 4096) -> tuple[str, LayerIndex]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            if name.endswith("/"):
                ti = tarfile.TarInfo(name.rstrip("/"))
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
                continue
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    result = write_estargz(buf.getvalue(), chunk_size=chunk_size)
    index = index_blob(result.blob, layer_annotations(result))
    assert index.verified
    return result.blob_digest, index


@pytest.fixture(scope="module")
def layer() -> tuple[str, LayerIndex]:
    return make_layer(
        {
            "bin/": b"",
            "bin/big": b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(512)),  # 4 chunks
            "bin/small": b"hello",
            "etc/empty": b"",
            "etc/zero": b"\0" * 9000,
        }
    )


def test_check_keeps_what_the_toc_has(layer: tuple[str, LayerIndex]) -> None:
    digest, idx = layer
    p = prof(
        (digest, [("bin/big", 5000, 100), ("bin/small", 0, 1 << 20), ("etc/empty", 0, 1)]),
    )
    kept, problems = check_against_image(p, {digest: idx})
    assert problems == []
    # Lengths clipped to the file; an empty file needs nothing.
    assert kept == prof((digest, [("bin/big", 5000, 100), ("bin/small", 0, 5)]))


def test_check_reports_each_problem_once(layer: tuple[str, LayerIndex]) -> None:
    digest, idx = layer
    p = prof(
        (L2, [("bin/big", 0, 1)]),  # another image's layer
        (digest, [("nope", 0, 1), ("bin", 0, 1), ("also/not", 0, 1), ("bin/small", 10, 1),
                  ("bin/big", 0, 1)]),
        (L3, [("x", 0, 1)]),
    )  # fmt: skip
    kept, problems = check_against_image(p, {digest: idx})
    assert kept == prof((digest, [("bin/big", 0, 1)]))
    msgs = [pr.message for pr in problems]
    assert len(msgs) == 4, msgs
    assert "not a layer of this image" in msgs[0] and L2 in msgs[0]
    assert "3 entries name no regular file" in msgs[1] and "'nope'" in msgs[1]
    assert "1 entry start past the file's end" in msgs[2] and "bin/small" in msgs[2]
    assert "not a layer of this image" in msgs[3] and L3 in msgs[3]


def test_chunks_in_entry_order_and_covered_bytes(layer: tuple[str, LayerIndex]) -> None:
    _, idx = layer
    big = idx.find("bin/big")
    small = idx.find("bin/small")
    zero = idx.find("etc/zero")
    assert big is not None and small is not None and zero is not None
    entries = [
        ProfileEntry("bin/small", 0, 5),
        ProfileEntry("bin/big", 8192, 5000),  # chunks 2 and 3
        ProfileEntry("bin/big", 0, 1),  # chunk 0
        ProfileEntry("bin/big", 9000, 1),  # chunk 2 again: listed once
        ProfileEntry("etc/zero", 0, 9000),
        ProfileEntry("missing", 0, 1),
    ]
    got = profile_chunks(idx, entries)
    big_chunks = idx.chunks(big)
    want = [
        (small, idx.chunks(small)[0]),
        (big, big_chunks[2]),
        (big, big_chunks[3]),
        (big, big_chunks[0]),
        # The zero file's full chunks are identical: one fetch serves them all.
        (zero, idx.chunks(zero)[0]),
        (zero, idx.chunks(zero)[2]),
    ]
    assert got == want
    ranges = covered_ranges(got)
    assert ranges == sorted(ranges)
    assert covered_bytes(got) == sum(e - s for s, e in ranges)
    assert covered_bytes(got) == sum(c.fetch_end - c.blob_offset for _, c in got)
    assert profile_chunks(idx, []) == []


# ==================================================================== OCI artifact


def test_artifact_manifest_shape() -> None:
    blob = serialize_profile(prof((L1, [("a", 0, 1)])))
    m = artifact_manifest(blob, OCI_MANIFEST, IMAGE, 1234, annotations={ANNOTATION_CREATED: "x"})
    d = json.loads(m)
    assert d["artifactType"] == ARTIFACT_TYPE
    assert d["mediaType"] == OCI_MANIFEST
    assert d["config"] == {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": 2}
    assert sha256_digest(b"{}") == EMPTY_DIGEST
    assert d["layers"] == [
        {"mediaType": PROFILE_MEDIA_TYPE, "digest": sha256_digest(blob), "size": len(blob)}
    ]
    assert d["subject"] == {"mediaType": OCI_MANIFEST, "digest": IMAGE, "size": 1234}
    # alsd's own manifest parser accepts it as an image manifest.
    assert parse_manifest(m).media_type == OCI_MANIFEST
    art = parse_artifact_manifest(m, IMAGE)
    assert (art.blob_digest, art.blob_size) == (sha256_digest(blob), len(blob))


def _mutate(m: bytes, **changes: Any) -> bytes:
    d = json.loads(m)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return json.dumps(d).encode()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"artifactType": "application/x-other"}, "artifactType"),
        ({"subject": {"mediaType": OCI_MANIFEST, "digest": L1, "size": 1}}, "subject"),
        ({"subject": None}, "subject"),
        ({"layers": []}, "exactly one layer"),
        ({"layers": [{"mediaType": "application/x-other", "digest": L1, "size": 1}]},
         "layer media type"),
        ({"layers": [{"mediaType": PROFILE_MEDIA_TYPE, "digest": L1, "size": 2 << 20}]},
         "exceeds"),
        ({"schemaVersion": 1}, "schemaVersion"),
        ({"mediaType": OCI_INDEX}, "media type"),
    ],
)  # fmt: skip
def test_artifact_manifest_refused(changes: dict[str, Any], message: str) -> None:
    m = artifact_manifest(b"{}", OCI_MANIFEST, IMAGE, 1)
    with pytest.raises(FormatError, match=message):
        parse_artifact_manifest(_mutate(m, **changes), IMAGE)


def test_referrers_tag() -> None:
    assert referrers_tag(IMAGE) == "sha256-" + "d" * 64
    with pytest.raises(FormatError):
        referrers_tag("nodigest")


def test_add_referrer_keeps_others_entries() -> None:
    other = {
        "mediaType": OCI_MANIFEST,
        "digest": L1,
        "size": 10,
        "artifactType": "application/vnd.dev.sigstore.bundle+json",
        "annotations": {"k": "v"},
        "x-unknown": [1, 2],
    }
    existing = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [other],
            "annotations": {"a": "b"},
        }
    ).encode()
    m1 = artifact_manifest(b"{}", OCI_MANIFEST, IMAGE, 1)
    d1 = referrer_descriptor(m1, annotations={ANNOTATION_CREATED: "2026-01-01T00:00:00Z"})
    idx = add_referrer(existing, d1)
    got = json.loads(idx)
    assert got["manifests"] == [other, d1]
    assert got["annotations"] == {"a": "b"}
    # Adding the same artifact again does not duplicate it.
    assert json.loads(add_referrer(idx, d1))["manifests"] == [other, d1]
    # A newer profile is added next to the older one.
    m2 = artifact_manifest(b"{ }", OCI_MANIFEST, IMAGE, 1)
    d2 = referrer_descriptor(m2, annotations={ANNOTATION_CREATED: "2026-02-01T00:00:00Z"})
    idx2 = add_referrer(idx, d2)
    refs = parse_referrers(idx2)
    assert [r.digest for r in refs] == [L1, d1["digest"], d2["digest"]]
    assert [r.digest for r in profile_referrers(refs)] == [d2["digest"], d1["digest"]]
    # No tag yet: a fresh index.
    fresh = json.loads(add_referrer(None, d1))
    assert fresh == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d1]}


def test_add_referrer_refuses_to_overwrite_a_non_index() -> None:
    with pytest.raises(FormatError):
        add_referrer(artifact_manifest(b"{}", OCI_MANIFEST, IMAGE, 1), {"digest": L1})
    with pytest.raises(FormatError):
        add_referrer(b"not json", {"digest": L1})


def test_parse_referrers_skips_malformed_entries() -> None:
    data = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                "junk",
                {"mediaType": OCI_MANIFEST, "digest": L1},
                {"mediaType": OCI_MANIFEST, "digest": L2, "size": 3, "artifactType": ARTIFACT_TYPE},
            ],
        }
    ).encode()
    refs = parse_referrers(data)
    assert [(r.digest, r.artifact_type) for r in refs] == [(L2, ARTIFACT_TYPE)]
    with pytest.raises(FormatError):
        parse_referrers(b"404 page not found")
    with pytest.raises(FormatError):
        parse_referrers(json.dumps({"schemaVersion": 2, "layers": []}).encode())
