"""Contracts of ``mmfusion.index``: search correctness, persistence, crash safety, corruption, concurrency.

Everything runs on CPU in ``tmp_path`` with a tiny deterministic fake model (mean colour for images, colour words
or a hash for texts), so each test takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from PIL import Image

import mmfusion.index as mindex
from mmfusion.index import AddReport, IndexCorruptError, ModelMismatchError, SearchIndex, persist

DIM = 8
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
PKG_PARENT = Path(mindex.__file__).resolve().parents[1]  # .../mmfusion


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _colour_vec(rgb) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[:3] = np.asarray(rgb, np.float32) / 255.0
    v[3] = 0.05  # keeps black images non-zero
    return _unit(v)


class FakeModel:
    """Image embedding = its mean colour; text = the colour it names, else a hash-seeded random direction."""

    embed_dim = DIM

    def __init__(self, fingerprint: str = "fake-v1", fail_on_black: bool = False):
        self.fingerprint, self.fail_on_black, self.image_calls = fingerprint, fail_on_black, 0

    def encode_image(self, images: list):
        import torch  # the model side may use torch; the index must not

        self.image_calls += 1
        rows = []
        for im in images:
            im = im if isinstance(im, Image.Image) else Image.open(im).convert("RGB")
            mean = np.asarray(im, np.float32).reshape(-1, 3).mean(0)
            if self.fail_on_black and mean.max() == 0:
                raise RuntimeError("black images upset this model")
            rows.append(_colour_vec(mean))
        return torch.from_numpy(np.stack(rows))

    def encode_text(self, texts: list[str]):
        rows = []
        for t in texts:
            named = [c for c in COLOURS if c in t.split()]
            if named:
                rows.append(_colour_vec(COLOURS[named[0]]))
            else:
                rows.append(_unit(np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIM)))
        return np.stack(rows)


def _image(path: Path, rgb) -> Path:
    Image.new("RGB", (8, 8), tuple(int(c) for c in rgb)).save(path)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    return [_image(tmp_path / f"{name}.png", rgb) for name, rgb in COLOURS.items()]


def _random_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, dim)))


def _contents(index: SearchIndex) -> dict:
    ids = sorted(index.ids())
    vecs = index.get_vectors(ids)
    return {i: (index.get_record(i).metadata, tuple(np.round(v, 5))) for i, v in zip(ids, vecs, strict=True)}


# ---- search ----------------------------------------------------------------------------------------------------
def test_text_image_and_embedding_queries(photos):
    index = SearchIndex.create(FakeModel())
    report = index.add_images(photos, metadata=[{"colour": p.stem} for p in photos])
    assert report.added == [str(p) for p in photos] and not report.skipped
    top = index.search("a red circle", k=2)
    assert [h.id for h in top][0] == str(photos[0]) and top[0].metadata == {"colour": "red"}
    assert top[0].score >= top[1].score
    blue = str(photos[2])
    assert index.search(blue, k=1)[0].id == blue  # str path of an existing image -> image query
    assert index.search(Path(blue), k=1)[0].id == blue
    assert index.search(Image.open(blue), k=1)[0].id == blue
    assert index.search(index.get_vectors([blue])[0], k=1)[0].id == blue  # 1-D numpy
    import torch

    assert index.search(torch.from_numpy(index.get_vectors([blue])), k=1)[0][0].id == blue  # 2-D torch -> batch
    assert index.search("photo.png", k=1)[0].id  # not an existing file: searched as text, no error


def test_batch_search_matches_single_queries(photos):
    index = SearchIndex.create(FakeModel())
    index.add_images(photos)
    queries = ["green", Path(photos[2]), "white wall", index.get_vectors([str(photos[0])])[0]]
    batch = index.search(queries, k=3)
    assert len(batch) == len(queries)
    for q, hits in zip(queries, batch, strict=True):
        assert hits == index.search(q, k=3)
    matrix = _random_vectors(5, seed=1)
    assert index.search(matrix, k=2) == [index.search(v, k=2) for v in matrix]


@pytest.mark.parametrize("mode", ["flat", "hnsw"])
def test_where_filter_equals_filtered_brute_force(mode):
    vecs = _random_vectors(300, seed=2)
    index = SearchIndex.create(None, embed_dim=DIM, mode=mode)
    labels = ["star" if i % 7 == 0 else "other" for i in range(300)]
    index.add_embeddings([f"v{i}" for i in range(300)], vecs, [{"label": lab} for lab in labels])
    q = _random_vectors(1, seed=3)[0]
    hits = index.search(q, k=5, where=lambda meta: meta["label"] == "star")
    stars = [i for i, lab in enumerate(labels) if lab == "star"]
    want = [f"v{stars[j]}" for j in np.argsort(-(vecs[stars] @ q))[:5]]
    assert [h.id for h in hits] == want
    assert all(h.metadata["label"] == "star" for h in hits)
    assert index.search(q, k=5, where=lambda meta: False) == []


# ---- add / remove / update -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["flat", "hnsw"])
def test_add_remove_update(mode):
    vecs = _random_vectors(50, seed=4)
    index = SearchIndex.create(None, embed_dim=DIM, mode=mode)
    index.add_embeddings([f"v{i}" for i in range(50)], vecs, [{"n": i} for i in range(50)])
    assert len(index) == 50 and "v3" in index and "nope" not in index
    assert index.remove(["v3", "v4", "missing"]) == 2
    assert len(index) == 48 and "v3" not in index
    assert all(h.id not in ("v3", "v4") for h in index.search(vecs[3], k=48))
    index.add_embeddings(["v5"], vecs[10:11], [{"n": "updated"}])  # replace: new vector and metadata
    assert len(index) == 48
    assert np.allclose(index.get_vectors(["v5"]), vecs[10])
    assert {h.id for h in index.search(vecs[10], k=2)} == {"v5", "v10"}
    assert index.get_record("v5").metadata == {"n": "updated"}
    assert index.remove("v6") == 1 and "v6" not in index  # a bare string is one id, not characters
    with pytest.raises(ValueError, match="duplicate"):
        index.add_embeddings(["a", "a"], vecs[:2])
    with pytest.raises(ValueError, match="shape"):
        index.add_embeddings(["a"], vecs[:1, :4])
    with pytest.raises(KeyError):
        index.get_record("v3")
    before = _contents(index)
    index.compact()  # hnsw: rebuilds the graph without the 4 dead nodes and renumbers; flat: nothing to do
    assert index._store._index.ntotal == len(index) == 47
    assert _contents(index) == before
    assert all(index.search(v, k=1)[0].id == f"v{i}" for i, v in enumerate(vecs) if i not in (3, 4, 5, 6, 10))


def test_unreadable_images_are_skipped_and_reported(tmp_path, photos):
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    good = (tmp_path / "red.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    black = _image(tmp_path / "black.png", (0, 0, 0))
    items = [photos[0], tmp_path / "garbage.jpg", tmp_path / "missing.png", tmp_path / "truncated.png", black]
    items.append(photos[1])
    index = SearchIndex.create(FakeModel(fail_on_black=True))
    report = index.add_images(items)
    assert report.added == [str(photos[0]), str(photos[1])]
    skipped = dict(report.skipped)
    assert set(skipped) == {str(p) for p in items[1:5]}
    assert "FileNotFoundError" in skipped[str(tmp_path / "missing.png")]
    assert "model failed" in skipped[str(black)]
    assert len(index) == 2


def test_incremental_add_skips_unchanged_files(photos):
    model = FakeModel()
    index = SearchIndex.create(model)
    index.add_images(photos)
    calls = model.image_calls
    report = index.add_images(photos, metadata=[{"pass": 2}] * len(photos))
    assert report.unchanged == [str(p) for p in photos] and model.image_calls == calls
    assert index.get_record(str(photos[0])).metadata == {"pass": 2}
    _image(photos[0], (0, 0, 255))  # same path, now blue
    os.utime(photos[0], ns=(1, 1))
    report = index.add_images(photos)
    assert report.added == [str(photos[0])] and report.unchanged == [str(p) for p in photos[1:]]
    assert {h.id for h in index.search("blue", k=2)} == {str(photos[0]), str(photos[2])}
    src = index.get_record(str(photos[0])).source
    assert src["kind"] == "image" and src["mtime_ns"] == 1 and Path(src["path"]).is_absolute()


# ---- persistence -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["flat", "hnsw"])
def test_save_open_round_trip(tmp_path, photos, mode):
    model = FakeModel()
    index = SearchIndex.create(model, mode=mode, ef_search=48)
    index.add_images(photos, metadata=[{"colour": p.stem, "tags": [1, 2]} for p in photos])
    index.add_embeddings(["raw"], _random_vectors(1, seed=5), [{"k": None}])
    index.remove([str(photos[3])])
    with pytest.raises(ValueError, match="no path"):
        index.save()
    path = index.save(tmp_path / "photos.idx")
    loaded = SearchIndex.open(path, model)
    assert len(loaded) == len(index) == 4 and loaded.mode == mode and loaded.ef_search == 48
    assert _contents(loaded) == _contents(index)
    assert loaded.search("green", k=4) == index.search("green", k=4)
    assert loaded.get_record(str(photos[0])).source == index.get_record(str(photos[0])).source
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == "fake-v1" and manifest["count"] == 4 and manifest["embed_dim"] == DIM
    loaded.add_embeddings(["later"], _random_vectors(1, seed=6))
    loaded.save()  # back to where it came from; the old generation is collected
    assert len(SearchIndex.open(path, model)) == 5
    entries = sorted(p.name for p in path.iterdir())
    assert len(entries) == 2 and entries[1] == "manifest.json" and entries[0] != manifest["generation"]


def test_model_mismatch_and_reembed(tmp_path, photos):
    index = SearchIndex.create(FakeModel("old"))
    index.add_images(photos[:3], metadata=[{"n": i} for i in range(3)])
    index.add_images([Image.new("RGB", (4, 4))], ids=["pil"])
    index.add_texts(["a green field"])
    index.save(tmp_path / "i.idx")
    with pytest.raises(ModelMismatchError, match="reembed=True"):
        SearchIndex.open(tmp_path / "i.idx", FakeModel("new"))
    photos[2].unlink()
    new = SearchIndex.open(tmp_path / "i.idx", FakeModel("new"), reembed=True)
    assert new.fingerprint == "new"
    assert sorted(new.reembed_report.added) == sorted([str(photos[0]), str(photos[1]), "a green field"])
    assert {i for i, _ in new.reembed_report.skipped} == {"pil", str(photos[2])}
    assert new.get_record(str(photos[1])).metadata == {"n": 1}
    assert new.search("red", k=1)[0].id == str(photos[0])
    new.save()
    assert SearchIndex.open(tmp_path / "i.idx", FakeModel("new")).fingerprint == "new"


# ---- crash safety ----------------------------------------------------------------------------------------------
def _saved_pair(tmp_path: Path, mode: str = "flat") -> tuple[SearchIndex, dict, dict]:
    """An index saved once (old contents), then changed in memory (new contents)."""
    index = SearchIndex.create(FakeModel(), mode=mode)
    index.add_embeddings(["a", "b", "c"], _random_vectors(3, seed=7), [{"v": 1}, {"v": 2}, {"v": 3}])
    index.save(tmp_path / "i.idx")
    old = _contents(index)
    index.remove(["a"])
    index.add_embeddings(["b", "d"], _random_vectors(2, seed=8), [{"v": 20}, {"v": 4}])
    return index, old, _contents(index)


def _count_fsyncs(tmp_path: Path, monkeypatch, mode: str) -> int:
    calls = []
    real = persist._fsync_path
    monkeypatch.setattr(persist, "_fsync_path", lambda p: (calls.append(p), real(p)))
    index, _, _ = _saved_pair(tmp_path / "probe", mode)
    calls.clear()
    index.save()
    monkeypatch.setattr(persist, "_fsync_path", real)
    return len(calls)


@pytest.mark.parametrize("mode", ["flat", "hnsw"])
def test_save_interrupted_at_every_step_leaves_old_or_new(tmp_path, monkeypatch, mode):
    steps = _count_fsyncs(tmp_path, monkeypatch, mode)
    assert steps >= 4
    for n in range(steps + 1):
        root = tmp_path / f"run{n}"
        index, old, new = _saved_pair(root, mode)
        calls = []

        def failing_fsync(p, n=n, calls=calls, real=persist._fsync_path):
            calls.append(p)
            if len(calls) > n:
                raise OSError("disk vanished")
            real(p)

        monkeypatch.setattr(persist, "_fsync_path", failing_fsync)
        if n < steps:
            with pytest.raises(OSError, match="disk vanished"):
                index.save()
        else:
            index.save()
        monkeypatch.undo()
        got = _contents(SearchIndex.open(root / "i.idx", FakeModel()))
        # Only the last fsync (of the directory) follows the manifest replace; before it the old index survives.
        assert got == (old if n < steps - 1 else new), f"interrupted at fsync {n} of {steps}"
        index.save()  # a later save succeeds and cleans up temporary leftovers
        assert not [p for p in (root / "i.idx").iterdir() if p.name.startswith(".tmp")]
        assert _contents(SearchIndex.open(root / "i.idx", FakeModel())) == new


@pytest.mark.parametrize("target", ["write_vectors", "write_items", "os.rename", "os.replace"])
def test_save_raising_mid_write_keeps_old_index(tmp_path, monkeypatch, target):
    index, old, _ = _saved_pair(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("injected failure")

    if target.startswith("os."):
        monkeypatch.setattr(os, target[3:], boom)
    else:
        monkeypatch.setattr(persist, target, boom)
    with pytest.raises(OSError, match="injected"):
        index.save()
    monkeypatch.undo()
    assert _contents(SearchIndex.open(tmp_path / "i.idx")) == old


def _stub_parent() -> str:
    # Import mmfusion.index without mmfusion/__init__.py (which loads the models): fast, and proves the index
    # depends on no model code.
    return (
        "import sys, types\n"
        f"pkg = types.ModuleType('mmfusion'); pkg.__path__ = [{str(PKG_PARENT)!r}]; sys.modules['mmfusion'] = pkg\n"
    )


def test_index_package_imports_no_model_code():
    code = _stub_parent() + (
        "import mmfusion.index\n"
        "bad = [m for m in sys.modules if m == 'torch' or (m.startswith('mmfusion.') and "
        "not m.startswith('mmfusion.index'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("where, expect", [("before_commit", "old"), ("after_commit", "new")])
def test_process_killed_mid_save(tmp_path, where, expect):
    index, old, new = _saved_pair(tmp_path)
    index.save(tmp_path / "new.idx")  # the same in-memory change, made again by the child below
    kill = {
        "before_commit": "os.replace = lambda *a, **k: os._exit(9)",
        "after_commit": "P.collect_garbage = lambda *a, **k: os._exit(9)",
    }[where]
    code = _stub_parent() + (
        "import os\nimport numpy as np\nimport mmfusion.index.persist as P\nfrom mmfusion.index import SearchIndex\n"
        f"src = SearchIndex.open({str(tmp_path / 'new.idx')!r})\n"
        f"idx = SearchIndex.open({str(tmp_path / 'i.idx')!r})\n"
        "idx.remove(idx.ids())\n"
        "ids = src.ids(); idx.add_embeddings(ids, src.get_vectors(ids), [src.get_record(i).metadata for i in ids])\n"
        f"{kill}\n"
        "idx.save()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 9
    assert _contents(SearchIndex.open(tmp_path / "i.idx")) == (old if expect == "old" else new)


# ---- corruption ------------------------------------------------------------------------------------------------
def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_with_matching_checksum(path: Path) -> None:
    """Garbage that the manifest vouches for: only the parsers' own checks can catch it."""
    path.write_bytes(b"\x93NUMPY garbage" * 10)
    manifest_path = path.parents[1] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = path.read_bytes()
    manifest["files"][path.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated_vectors": ("flat", "vectors.npy", lambda p: p.write_bytes(p.read_bytes()[:-40])),
    "flipped_vectors": ("flat", "vectors.npy", _flip_byte),
    "lying_manifest_vectors": ("flat", "vectors.npy", _rewrite_with_matching_checksum),
    "missing_vectors": ("flat", "vectors.npy", lambda p: p.unlink()),
    "garbage_items": ("flat", "items.sqlite", lambda p: p.write_bytes(os.urandom(p.stat().st_size))),
    "truncated_graph": ("hnsw", "hnsw.faiss", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "flipped_graph": ("hnsw", "hnsw.faiss", _flip_byte),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_file_gives_clear_error(tmp_path, case):
    mode, name, damage = CORRUPTIONS[case]
    index = SearchIndex.create(None, embed_dim=DIM, mode=mode)
    index.add_embeddings([f"v{i}" for i in range(20)], _random_vectors(20), [{"i": i} for i in range(20)])
    root = index.save(tmp_path / "i.idx")
    generation = json.loads((root / "manifest.json").read_text())["generation"]
    damage(root / generation / name)
    with pytest.raises(IndexCorruptError, match=name):
        SearchIndex.open(root)


@pytest.mark.parametrize(
    "content", [b"\x00\xffnot json", b"[1, 2, 3]", b'{"format": "mmfusion-index"}', b'{"format": "other"}', b""]
)
def test_garbage_manifest_gives_clear_error(tmp_path, content):
    index = SearchIndex.create(None, embed_dim=DIM)
    index.add_embeddings(["a"], _random_vectors(1))
    root = index.save(tmp_path / "i.idx")
    (root / "manifest.json").write_bytes(content)
    with pytest.raises(IndexCorruptError, match="manifest.json"):
        SearchIndex.open(root)
    with pytest.raises(FileNotFoundError):
        SearchIndex.open(tmp_path / "nothing.idx")


# ---- property-based: random operation sequences against a dict model ------------------------------------------
ID_POOL = [f"id{i}" for i in range(10)]


class IndexMachine(RuleBasedStateMachine):
    mode = "flat"

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="mmfusion-index-"))
        self.index = SearchIndex.create(None, embed_dim=DIM, mode=self.mode)
        self.model: dict[str, tuple[np.ndarray, dict]] = {}
        self.saved: dict | None = None
        self.adds = 0

    @rule(ids=st.lists(st.sampled_from(ID_POOL), min_size=1, max_size=4, unique=True), tag=st.integers(0, 3))
    def add(self, ids, tag):
        self.adds += 1
        vecs = _random_vectors(len(ids), seed=self.adds)
        metas = [{"tag": tag, "add": self.adds} for _ in ids]
        self.index.add_embeddings(ids, vecs, metas)
        self.model.update({i: (v, m) for i, v, m in zip(ids, vecs, metas, strict=True)})

    @rule(ids=st.lists(st.sampled_from(ID_POOL), max_size=3))
    def remove(self, ids):
        assert self.index.remove(ids) == len(set(ids) & self.model.keys())
        for i in ids:
            self.model.pop(i, None)

    @rule()
    def save(self):
        self.index.save(self.dir / "i.idx")
        self.saved = dict(self.model)

    @precondition(lambda self: self.saved is not None)
    @rule()
    def reopen(self):
        self.index = SearchIndex.open(self.dir / "i.idx")
        self.model = dict(self.saved)

    @invariant()
    def agrees_with_dict(self):
        assert len(self.index) == len(self.model) and set(self.index.ids()) == set(self.model)
        if not self.model:
            return
        ids = sorted(self.model)
        assert np.allclose(self.index.get_vectors(ids), np.stack([self.model[i][0] for i in ids]), atol=1e-6)
        assert [self.index.get_record(i).metadata for i in ids] == [self.model[i][1] for i in ids]
        top = self.index.search(np.stack([self.model[i][0] for i in ids]), k=1)
        assert [hits[0].id for hits in top] == ids
        tag = self.model[ids[0]][1]["tag"]
        want = {i for i in ids if self.model[i][1]["tag"] == tag}
        assert {h.id for h in self.index.search(self.model[ids[0]][0], k=10, where=lambda m: m["tag"] == tag)} == want

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class HNSWIndexMachine(IndexMachine):
    mode = "hnsw"  # under 64 items efSearch covers the whole graph, so top-1 is exact here too


_MACHINE_SETTINGS = settings(
    max_examples=50, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = _MACHINE_SETTINGS
TestHNSWIndexMachine = HNSWIndexMachine.TestCase
TestHNSWIndexMachine.settings = _MACHINE_SETTINGS


# ---- concurrency -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["flat", "hnsw"])
def test_concurrent_searches_during_adds(mode):
    n, step = 1500, 50
    vecs = _random_vectors(n, seed=9, dim=16)
    index = SearchIndex.create(None, embed_dim=16, mode=mode)
    committed = [0]  # items [0, committed) are fully added
    done = threading.Event()
    errors: list[BaseException] = []
    checks: list[tuple[int, int]] = []  # per reader: (queries, exact top-1 hits)

    def writer():
        try:
            for lo in range(0, n, step):
                ids = [f"v{i}" for i in range(lo, lo + step)]
                index.add_embeddings(ids, vecs[lo : lo + step], [{"batch": lo}] * step)
                committed[0] = lo + step
                if lo:  # re-add an earlier batch: a remove + add inside faiss while readers run
                    old = lo - step
                    index.add_embeddings([f"v{i}" for i in range(old, lo)], vecs[old:lo], [{"batch": old}] * step)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    def reader(seed):
        rng = np.random.default_rng(seed)
        queries = exact = 0
        try:
            while not done.is_set() or queries < 10:  # a few checks per reader even on a slow machine
                upto = committed[0]
                if not upto:
                    continue
                j = int(rng.integers(upto))
                hits = index.search(vecs[j], k=5)
                bound = committed[0] + step  # items being added right now may already be visible
                assert len(hits) == 5 and all(int(h.id[1:]) < bound for h in hits)
                assert all(a.score >= b.score for a, b in zip(hits[:-1], hits[1:], strict=True))
                assert all(h.metadata["batch"] == int(h.id[1:]) // step * step for h in hits)
                queries += 1
                exact += hits[0].id == f"v{j}" and abs(hits[0].score - 1) < 1e-4
        except BaseException as e:
            errors.append(e)
        checks.append((queries, exact))

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    queries, exact = map(sum, zip(*checks, strict=True))
    assert queries > 20
    assert exact == queries if mode == "flat" else exact >= 0.95 * queries
    assert len(index) == n


# ---- approximate mode ------------------------------------------------------------------------------------------
def test_hnsw_recall_at_10_vs_exact():
    rng = np.random.default_rng(10)
    centres = rng.standard_normal((50, 32))
    data = _unit(centres[rng.integers(50, size=5000)] + 0.3 * rng.standard_normal((5000, 32)))
    queries = _unit(centres[rng.integers(50, size=200)] + 0.3 * rng.standard_normal((200, 32)))
    ids = [str(i) for i in range(5000)]
    exact = SearchIndex.create(None, embed_dim=32)
    approx = SearchIndex.create(None, embed_dim=32, mode="hnsw", ef_search=64)
    for index in (exact, approx):
        index.add_embeddings(ids, data)
    truth = exact.search(queries, k=10)
    got = approx.search(queries, k=10)
    recall = np.mean([len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(got, truth, strict=True)])
    assert recall >= 0.9, recall


def test_add_report_str():
    assert str(AddReport(added=["a"], skipped=[("b", "bad")])) == "added 1, unchanged 0, skipped 1"
