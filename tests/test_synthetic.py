"""Contracts of the synthetic shapes dataset: determinism, held-out split, pixels vs JSON, captions, shards, cache."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmfusion.data import synthetic as S


def _scenes(split: str, n: int, seed: int = 0) -> list[dict]:
    return [S.sample_scene(S._sample_rng(seed, split, i), split) for i in range(n)]


def _shards(pattern: str) -> list[Path]:
    return [Path(p) for p in braceexpand.braceexpand(pattern)]


def test_public_constants():
    assert len(S.SHAPES) >= 6 and len(set(S.SHAPES)) == len(S.SHAPES)
    assert len(S.COLORS) >= 8 and S.SIZES == ("small", "large")
    rgb = np.array(list(S.COLORS.values()), float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=2) + np.eye(len(rgb)) * 1e9
    assert dist.min() > 80, "object colours must be well separated"
    n_combos = len(S.SHAPES) * len(S.COLORS)
    assert all(c in S.COLORS and s in S.SHAPES for c, s in S.HELDOUT_COMBOS)
    assert 0.05 <= len(S.HELDOUT_COMBOS) / n_combos <= 0.15


def test_make_sample_is_deterministic_and_seed_dependent():
    a, b = S.make_sample(7, "train", seed=0), S.make_sample(7, "train", seed=0)
    assert a == b and a["__key__"] == "train-0000007"
    assert S.make_sample(7, "train", seed=1)["png"] != a["png"]
    assert S.make_sample(8, "train", seed=0)["png"] != a["png"]
    assert S.make_sample(7, "val", seed=0)["png"] != a["png"]


def test_shards_byte_identical_across_runs_and_processes(tmp_path):
    kw = dict(split="val", n=24, image_size=32, samples_per_shard=10)
    pa = S.write_synthetic_shards(tmp_path / "a", seed=3, processes=1, **kw)
    pb = S.write_synthetic_shards(tmp_path / "b", seed=3, processes=2, **kw)  # parallel must not change bytes
    pc = S.write_synthetic_shards(tmp_path / "c", seed=4, processes=1, **kw)
    fa, fb, fc = _shards(pa), _shards(pb), _shards(pc)
    assert len(fa) == 3
    assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(fa, fc, strict=True))


def test_heldout_combos_never_in_train_and_present_in_val():
    train = _scenes("train", 2000)
    seen = {(o["color"], o["shape"]) for s in train for o in s["objects"]}
    assert not seen & S.HELDOUT_COMBOS
    assert not any(s["unseen"] for s in train)
    val = _scenes("val", 1000)
    unseen_frac = np.mean([s["unseen"] for s in val])
    assert 0.25 <= unseen_frac <= 0.35
    val_combos = {(o["color"], o["shape"]) for s in val for o in s["objects"]}
    assert S.HELDOUT_COMBOS <= val_combos
    for s in val:  # the flag agrees with the objects
        assert s["unseen"] == any((o["color"], o["shape"]) in S.HELDOUT_COMBOS for o in s["objects"])


def test_coverage_and_object_counts():
    scenes = _scenes("train", 1000) + _scenes("val", 300)
    objs = [o for s in scenes for o in s["objects"]]
    assert {o["shape"] for o in objs} == set(S.SHAPES)
    assert {o["color"] for o in objs} == set(S.COLORS)
    assert {o["size"] for o in objs} == set(S.SIZES)
    assert len({o["position"] for o in objs}) == 9
    assert {r["relation"] for s in scenes for r in s["relations"]} == set(S.RELATIONS)
    assert {s["background"]["kind"] for s in scenes} == {"plain", "gradient", "noise"}
    counts = Counter(s["n_objects"] for s in scenes)
    assert set(counts) == {1, 2, 3} and 0.4 <= counts[1] / len(scenes) <= 0.6


def test_scene_geometry():
    for s in _scenes("val", 500):
        objs = s["objects"]
        assert s["n_objects"] == len(objs) and s["label"] == objs[0]["shape"]
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < o["cx"] < x1 <= 1 and 0 <= y0 < o["cy"] < y1 <= 1
            side = max(x1 - x0, y1 - y0)  # the longer bbox side is the object's scale
            assert side == pytest.approx(o["scale"], abs=2e-4)
            assert (0.22 <= o["scale"] <= 0.28) if o["size"] == "small" else (0.40 <= o["scale"] <= 0.50)
            assert all(type(v) is float for v in (o["cx"], o["cy"], *o["bbox"]))
            col = "left" if o["cx"] < 1 / 3 else "right" if o["cx"] > 2 / 3 else ""
            row = "top" if o["cy"] < 1 / 3 else "bottom" if o["cy"] > 2 / 3 else ""
            assert o["position"] == (f"{row} {col}".strip() or "center")
            assert tuple(o["rgb"]) == S.COLORS[o["color"]]
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert S._separation(a["bbox"], b["bbox"]) > 0, "objects overlap"
        for r in s["relations"]:
            a, b = objs[r["a"]], objs[r["b"]]
            if r["relation"] == "above":
                assert a["bbox"][3] < b["bbox"][1]
            elif r["relation"] == "below":
                assert a["bbox"][1] > b["bbox"][3]
            elif r["relation"] == "left of":
                assert a["bbox"][2] < b["bbox"][0]
            else:
                assert a["bbox"][0] > b["bbox"][2]


def test_backgrounds_stay_far_from_object_colours():
    palette = np.array(list(S.COLORS.values()), float)
    scenes = _scenes("train", 400)
    ends = np.array([s["background"][k] for s in scenes for k in ("rgb", "rgb2") if k in s["background"]], float)
    assert np.linalg.norm(ends[:, None] - palette[None], axis=2).min() >= 75
    for s in scenes[:60]:  # every rendered pixel, noise and gradients included
        img = np.asarray(S.render_scene({**s, "objects": []}, 32), float)
        assert np.linalg.norm(img[:, :, None] - palette[None, None], axis=3).min() >= 45


def test_pixels_match_json():
    size = 64
    for i in range(150):
        sample = S.make_sample(i, "val", seed=0, image_size=size)
        meta = json.loads(sample["json"])
        img = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(float)
        assert img.shape == (size, size, 3)
        objs = meta["objects"]
        inside = np.zeros((size, size), bool)
        for o in objs:
            # Every template contains its bbox centre, so the 2x2 pixels there carry the flat object colour.
            px, py = int(o["cx"] * size), int(o["cy"] * size)
            centre = img[py - 1 : py + 1, px - 1 : px + 1].reshape(-1, 3)
            assert np.abs(centre - o["rgb"]).max() <= 2, (i, o)
            x0, y0, x1, y1 = (np.array(o["bbox"]) * size).round().astype(int)
            inside[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
        # The background never looks like an object colour, and every object-coloured pixel lies in a bbox.
        palette = np.array(list(S.COLORS.values()), float)
        near = np.linalg.norm(img[:, :, None] - palette[None, None], axis=3).min(2) < 25
        assert not (near & ~inside).any(), i


def test_captions_name_every_object():
    words = {s: {s, *S.SHAPE_SYNONYMS.get(s, ())} for s in S.SHAPES}
    captions = []
    for i in range(600):
        rng = S._sample_rng(0, "val", i)
        scene = S.sample_scene(rng, "val")
        cap = S.caption_scene(scene, rng)
        captions.append(cap)
        assert len(cap.split()) <= 24, cap  # stays inside the 32-token text context
        for o in scene["objects"]:
            assert any(f"{o['color']} {w}" in cap for w in words[o["shape"]]), (cap, o)
    text = "\n".join(captions)
    assert " box" in text and (" ball" in text or " disc" in text), "synonyms are used sometimes"
    assert "two shapes:" in text and "there is" in text and "three shapes:" in text
    assert sum(any(w in c for w in ("small", "little", "large", "big")) for c in captions) > 0.6 * len(captions)
    assert len(set(captions)) > 0.95 * len(captions)


def test_shards_readable_by_webdataset(tmp_path):
    pattern = S.write_synthetic_shards(tmp_path, "train", 25, seed=0, image_size=32, samples_per_shard=10)
    assert pattern == f"{tmp_path}/train-{{000000..000002}}.tar"
    with tarfile.open(_shards(pattern)[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["train-0000000.png", "train-0000000.txt", "train-0000000.json"]
    assert all(m.mtime == 0 and m.uid == 0 for m in members)
    samples = list(wds.WebDataset(pattern, shardshuffle=False))
    assert len(samples) == 25
    assert [s["__key__"] for s in samples] == [f"train-{i:07d}" for i in range(25)]
    for s in samples:
        assert {"png", "txt", "json"} <= set(s)
        assert Image.open(io.BytesIO(s["png"])).size == (32, 32)
        meta = json.loads(s["json"])
        assert meta["caption"] == s["txt"].decode() and meta["n_objects"] == len(meta["objects"])
    single = S.write_synthetic_shards(tmp_path / "one", "val", 5, seed=0, image_size=32)
    assert len(list(wds.WebDataset(single, shardshuffle=False))) == 5


def test_cache_skips_rewrite_and_invalidates(tmp_path):
    paths = S.ensure_synthetic_dataset(tmp_path, n_train=12, n_val=6, seed=1, image_size=32)
    sub = tmp_path / "seed1-px32-n12-6"
    assert paths == {"train": f"{sub}/train-{{000000..000000}}.tar", "val": f"{sub}/val-{{000000..000000}}.tar"}
    shard = sub / "train-000000.tar"
    manifest = json.loads((sub / "train.manifest.json").read_text())
    assert manifest["n"] == 12 and manifest["seed"] == 1 and manifest["image_size"] == 32 and "version" in manifest
    # A rewrite goes through os.replace, so it always shows as a new inode even within one mtime tick.
    before = (shard.stat().st_mtime_ns, shard.stat().st_ino)
    assert S.ensure_synthetic_dataset(tmp_path, n_train=12, n_val=6, seed=1, image_size=32) == paths
    assert (shard.stat().st_mtime_ns, shard.stat().st_ino) == before
    # A manifest that does not match (e.g. an older generator version) forces a rebuild.
    (sub / "train.manifest.json").write_text(json.dumps({**manifest, "version": -1}))
    S.ensure_synthetic_dataset(tmp_path, n_train=12, n_val=6, seed=1, image_size=32)
    assert (shard.stat().st_mtime_ns, shard.stat().st_ino) != before
    assert not list(sub.glob("*.tmp*")), "temporary files are renamed into place"
