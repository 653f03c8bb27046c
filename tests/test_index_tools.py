"""Contracts of ``tools/build_index.py``, ``tools/retrieve.py`` and ``mmfusion.index.build`` on a real checkpoint.

A tiny model is trained once per module (a few steps on the session's synthetic shards); photo folders are rendered
synthetic scenes in ``tmp_path``. The tools run in-process through their ``main(argv)``; only the torchrun test
needs subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mmfusion
from mmfusion import SearchIndex
from mmfusion.config import load_config
from mmfusion.data.synthetic import render_scene, sample_scene, write_synthetic_shards
from mmfusion.index.build import build_from_folder, rank_shards
from mmfusion.train import train
from mmfusion.train.checkpoint import read_state, save_checkpoint
from tests.conftest import tiny_overrides

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_tool, retrieve_tool = _tool("build_index"), _tool("retrieve")
PHOTOS = ["a.png", "b.png", "c.png", "d.png", "e.png", "sub/f.png", "sub/g.png", "sub/deeper/h.png"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synthetic) -> str:
    """A checkpoint directory of a tiny model trained for a few steps (once per module)."""
    cfg = load_config("tiny", tiny_overrides(synthetic, "train.steps=5", "train.batch_size=32", "data.val="))
    run = train(cfg, run_dir=tmp_path_factory.mktemp("run"), progress=False)
    return str(run["checkpoint"])


@pytest.fixture(scope="module")
def model(ckpt) -> mmfusion.MMFusion:
    return mmfusion.load(ckpt)


def _photos(folder: Path, names=PHOTOS, seed: int = 0) -> Path:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        render_scene(sample_scene(np.random.default_rng([seed, i]), "val"), 64).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    return folder


def _run(tool, argv: list[str], capsys) -> tuple[int, str, str]:
    rc = tool.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _build(ckpt: str, images: Path, out: Path, capsys) -> list[str]:
    rc, out_text, err = _run(
        build_tool, ["--checkpoint", ckpt, "--images", str(images), "--out", str(out), "--no-progress"], capsys
    )
    assert rc == 0, err
    return out_text.splitlines()


def test_build_from_folder_then_retrieve(tmp_path, ckpt, capsys):
    photos = _photos(tmp_path / "photos")
    lines = _build(ckpt, photos, tmp_path / "photos.idx", capsys)
    assert f"added {len(PHOTOS)}, unchanged 0, removed 0, skipped 1" in lines[0] and "images/s" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("skipped broken.jpg: cannot read image")

    base = ["--index", str(tmp_path / "photos.idx")]  # no --checkpoint: the index records the one that built it
    rc, out, _ = _run(retrieve_tool, [*base, "--text", "a red circle at the top", "--k", "5", "--json"], capsys)
    hits = json.loads(out)
    assert rc == 0 and len(hits) == 5 and {h["id"] for h in hits} <= set(PHOTOS)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    rc, out, _ = _run(
        retrieve_tool, [*base, "--image", str(photos / "sub/f.png"), "--json", "--checkpoint", ckpt], capsys
    )
    hits = json.loads(out)
    assert rc == 0 and len(hits) == len(PHOTOS)  # k=10 > items: every item once
    assert hits[0]["id"] == "sub/f.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    rc, out, _ = _run(retrieve_tool, [*base, "--text", "a blue square", "--k", "3"], capsys)
    rows = [line.split() for line in out.splitlines()]
    assert rc == 0 and len(rows) == 3 and all(r[1] in PHOTOS for r in rows)
    assert [float(r[0]) for r in rows] == sorted((float(r[0]) for r in rows), reverse=True)


def test_incremental_rebuild_embeds_only_new_and_changed(tmp_path, ckpt, model, capsys):
    photos = _photos(tmp_path / "photos")
    _build(ckpt, photos, tmp_path / "photos.idx", capsys)
    _photos(photos, ["new.png"], seed=1)
    (photos / "b.png").unlink()
    stat = (photos / "sub/g.png").stat()
    os.utime(photos / "sub/g.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch: same bytes, new mtime

    embedded = []
    real_encode = model.encode_image
    model.encode_image = lambda images, *a, **k: (embedded.extend(images), real_encode(images, *a, **k))[1]
    try:
        report = build_from_folder(model, photos, tmp_path / "photos.idx", progress=False)
    finally:
        del model.encode_image  # back to the class method
    assert sorted(report.added) == ["new.png", "sub/g.png"] and len(embedded) == 2
    assert report.removed == ["b.png"]
    assert sorted(report.unchanged) == sorted(set(PHOTOS) - {"b.png", "sub/g.png"})
    assert [i for i, _ in report.skipped] == ["broken.jpg"]
    index = SearchIndex.open(tmp_path / "photos.idx", model)
    assert sorted(index.ids()) == sorted(set(PHOTOS) - {"b.png"} | {"new.png"})

    lines = _build(ckpt, photos, tmp_path / "photos.idx", capsys)  # nothing changed since
    assert f"added 0, unchanged {len(PHOTOS)}, removed 0, skipped 1" in lines[0]

    (tmp_path / "unmounted").mkdir()  # an empty folder must not wipe the index
    with pytest.raises(ValueError, match="refusing to remove all"):
        build_from_folder(model, tmp_path / "unmounted", tmp_path / "photos.idx", progress=False)
    assert len(SearchIndex.open(tmp_path / "photos.idx", model)) == len(PHOTOS)


def test_retrieve_errors_are_one_line(tmp_path, ckpt, capsys):
    photos = _photos(tmp_path / "photos", PHOTOS[:2])
    (photos / "notes.txt").write_text("not an image")
    _build(ckpt, photos, tmp_path / "p.idx", capsys)
    (tmp_path / "empty").mkdir()
    _build(ckpt, tmp_path / "empty", tmp_path / "empty.idx", capsys)
    cases = [
        (["--index", str(tmp_path / "missing.idx"), "--text", "a red circle"], "missing.idx"),
        (["--index", str(tmp_path / "p.idx"), "--image", str(photos / "notes.txt")], "notes.txt"),
        (["--index", str(tmp_path / "p.idx"), "--image", str(photos / "broken.jpg")], "broken.jpg"),
        (["--index", str(tmp_path / "p.idx"), "--image", str(photos / "nope.png")], "nope.png"),
        (["--index", str(tmp_path / "p.idx"), "--text", ""], "empty"),
        (["--index", str(tmp_path / "p.idx"), "--image", ""], "query image '': no such file"),  # not "image ."
        (["--index", str(tmp_path / "empty.idx"), "--text", "a red circle"], "empty.idx"),
    ]
    for argv, named in cases:
        rc, out, err = _run(retrieve_tool, argv, capsys)
        assert rc == 2 and not out, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err


def test_build_errors_are_one_line(tmp_path, ckpt, model, capsys):
    photos = _photos(tmp_path / "photos", PHOTOS[:1])
    _build(ckpt, photos, tmp_path / "p.idx", capsys)
    # Another model: the same config with nudged weights, saved as a checkpoint of its own.
    other = mmfusion.load(ckpt)
    next(other.model.parameters()).data.add_(0.01)
    other_ckpt = save_checkpoint(tmp_path / "other", 1, other.model, None, {"config": read_state(Path(ckpt))["config"]})
    cases = [
        (["--checkpoint", str(tmp_path / "no-run"), "--images", str(photos)], "no-run"),
        (["--checkpoint", ckpt, "--images", str(tmp_path / "no-folder")], "no-folder"),
        (["--checkpoint", ckpt, "--shards", f"{tmp_path}/none-*.tar"], "none-*.tar"),
        (["--checkpoint", str(other_ckpt), "--images", str(photos)], "p.idx"),
    ]
    for argv, named in cases:
        out = "p.idx" if named == "p.idx" else "x.idx"
        rc, stdout, err = _run(build_tool, [*argv, "--out", str(tmp_path / out), "--no-progress"], capsys)
        assert rc == 2 and not stdout, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "x.idx").exists()


@pytest.fixture(scope="module")
def val_index(tmp_path_factory, ckpt, synthetic) -> Path:
    out = tmp_path_factory.mktemp("val") / "val.idx"
    assert (
        build_tool.main(["--checkpoint", ckpt, "--shards", synthetic["val"], "--out", str(out), "--no-progress"]) == 0
    )
    return out


def _shard_keys(pattern: str) -> list[str]:
    import tarfile

    from mmfusion.data import expand_shards

    keys = set()
    for url in expand_shards(pattern):
        with tarfile.open(url) as tar:
            keys |= {m.name.rsplit(".", 1)[0] for m in tar if m.name.endswith(".png")}
    return sorted(keys)


def test_build_from_shards_uses_sample_keys(val_index, model, synthetic):
    index = SearchIndex.open(val_index, model)
    assert sorted(index.ids()) == _shard_keys(synthetic["val"])
    record = index.get_record("val-0000007")
    assert record.metadata["caption"] and record.metadata["split"] == "val" and record.metadata["index"] == 7
    assert json.loads((val_index / "build.json").read_text())["shards"] == synthetic["val"]


def test_index_text_to_image_recall_equals_evaluate(val_index, model, synthetic):
    """Acceptance: R@1 of caption queries through the index == what tools/eval.py reports for the same shards."""
    index = SearchIndex.open(val_index, model)
    ids = index.ids()
    captions = [index.get_record(i).metadata["caption"] for i in ids]
    hits = index.search(captions, k=2)  # one query per sample, as in evaluation (repeated captions included)
    hit = [h[0].metadata["caption"] == c for h, c in zip(hits, captions, strict=True)]
    recall = 100.0 * np.mean(hit)
    expected = model.evaluate(synthetic["val"])["text_to_image_R@1"]
    # faiss and torch may break an exact tie (or a gap within float error) differently; only such queries may differ.
    ambiguous = sum(
        abs(h[0].score - h[1].score) < 1e-5 and (h[0].metadata["caption"] == c) != (h[1].metadata["caption"] == c)
        for h, c in zip(hits, captions, strict=True)
    )
    assert abs(recall - expected) <= 100.0 * ambiguous / len(ids) + 1e-6, (recall, expected, ambiguous)


def test_rank_shards_split():
    urls = [f"s{i}" for i in range(5)]
    assert [rank_shards(urls, r, 2) for r in range(2)] == [["s0", "s2", "s4"], ["s1", "s3"]]
    assert [rank_shards(urls[:1], r, 3) for r in range(3)] == [["s0"], [], []]


@pytest.mark.slow
def test_build_from_shards_under_torchrun(tmp_path, ckpt, model):
    pattern = write_synthetic_shards(tmp_path / "shards", "test", n=24, samples_per_shard=8)  # 3 shards, 2 ranks
    out = tmp_path / "t.idx"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(TOOLS / "build_index.py"),
    ]
    cmd += ["--checkpoint", ckpt, "--shards", pattern, "--out", str(out), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "added 24, unchanged 0, removed 0, skipped 0" in proc.stdout
    assert proc.stdout.count("added") == 1  # rank 0 reports, once
    index = SearchIndex.open(out, model)
    assert sorted(index.ids()) == _shard_keys(pattern)
    single = tmp_path / "single.idx"
    assert build_tool.main(["--checkpoint", ckpt, "--shards", pattern, "--out", str(single), "--no-progress"]) == 0
    ids = sorted(index.ids())
    np.testing.assert_allclose(index.get_vectors(ids), SearchIndex.open(single, model).get_vectors(ids), atol=1e-5)
