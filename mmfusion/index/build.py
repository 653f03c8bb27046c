"""Building a :class:`SearchIndex` from a folder of images or from webdataset shards, and querying it once built.

* :func:`build_from_folder` is incremental: ids are paths relative to the folder, a file whose (mtime, size) is
  unchanged is not re-embedded (the index's own incremental add), and ids whose files are gone are removed.
* :func:`build_from_shards` embeds every sample (id = its ``__key__``), split over torchrun ranks; decoding runs in
  the loader workers and the model sees the already-transformed tensors, as in training and evaluation.
* :func:`search` runs one validated text or image query.

Next to the index's manifest, ``build.json`` records which checkpoint built it, so a query tool needs only the index
path. It is a sidecar the index's own saves never touch (they only replace ``manifest.json`` and ``gen-*``); the
manifest's fingerprint stays the authority, so a stale sidecar can only lead to a :class:`ModelMismatchError`.

This module uses the data pipeline and torch, so ``mmfusion/index/__init__.py`` does not import it: the index proper
stays importable without model code. It takes the model duck-typed (``mmfusion.api.MMFusion``), never imports it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mmfusion.cli import shown_path

from . import persist
from .errors import IndexCorruptError, ModelMismatchError
from .inputs import IMAGE_SUFFIXES, load_image, to_numpy
from .search import SearchIndex
from .store import Hit

BUILD_INFO = "build.json"
# What a directory we created may hold before its first save completes (an interrupted first build).
_OURS = ("gen-", ".tmp-gen-", BUILD_INFO, f".{BUILD_INFO}.tmp")


@dataclass
class BuildReport:
    """What a build did. ``added`` were embedded (new or changed), ``unchanged`` kept their vectors, ``removed`` were
    dropped (file deleted, or now unreadable), ``skipped`` holds ``(id, reason)`` for inputs that could not be read.
    ``seconds`` is the time spent reading and embedding (saving excluded)."""

    path: Path
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return len(self.added) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.path}: added {len(self.added)}, unchanged {len(self.unchanged)}, removed {len(self.removed)}, "
            f"skipped {len(self.skipped)} ({self.images_per_s:.1f} images/s)"
        )


# ---- the index on disk -------------------------------------------------------------------------------------------
def check_target(model: Any, out_path: str | os.PathLike, mode: str | None = None) -> None:
    """Raise before any embedding work if ``out_path`` cannot take this build: an index made by another model or in
    another mode, or a path holding something that is not an index. Reads the manifest only, so every rank can."""
    root = Path(out_path)
    if not (root / persist.MANIFEST).exists():
        stray = [p.name for p in root.iterdir() if not p.name.startswith(_OURS)] if root.is_dir() else []
        if root.exists() and (not root.is_dir() or stray):
            raise FileExistsError(f"{root} exists and is not an index: refusing to write over it")
        return
    manifest = persist.read_manifest(root)
    if manifest.get("model_fingerprint") != model.fingerprint or manifest["embed_dim"] != int(model.embed_dim):
        raise ModelMismatchError(
            f"index {root} was built with model {manifest.get('model_fingerprint')!r}, not with the given checkpoint"
            f" ({model.fingerprint!r}): use the checkpoint that built it, or write a new index"
        )
    if mode is not None and mode != manifest["mode"]:
        raise ValueError(f"index {root} is {manifest['mode']}, not {mode}: write a new index to change the mode")


def _open_or_create(model: Any, out_path: str | os.PathLike, mode: str | None) -> SearchIndex:
    check_target(model, out_path, mode)
    if (Path(out_path) / persist.MANIFEST).exists():
        return SearchIndex.open(out_path, model)
    return SearchIndex.create(model, out_path, mode=mode or "flat")


def _save(index: SearchIndex, model: Any, built_from: dict[str, str]) -> None:
    root = index.save()
    ckpt = getattr(model, "checkpoint", None)
    info = {
        "checkpoint": str(Path(ckpt).resolve()) if ckpt else None,
        "model_fingerprint": model.fingerprint,
        **built_from,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = root / f".{BUILD_INFO}.tmp"
    tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(tmp, root / BUILD_INFO)


def read_build_info(index_path: str | os.PathLike) -> dict[str, Any]:
    """The ``build.json`` of an index ({} for an index built otherwise). Raises ``FileNotFoundError`` naming the path
    when there is no index there, :class:`IndexCorruptError` for a damaged manifest or sidecar."""
    root = Path(index_path)
    persist.read_manifest(root)
    try:
        info = json.loads((root / BUILD_INFO).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexCorruptError(f"{root / BUILD_INFO} is unreadable: {e}") from e
    if not isinstance(info, dict):
        raise IndexCorruptError(f"{root / BUILD_INFO} is not a JSON object")
    return info


# ---- folders -----------------------------------------------------------------------------------------------------
def list_images(images_dir: str | os.PathLike) -> list[str]:
    """Image files under ``images_dir`` (recursively, by suffix) as sorted POSIX paths relative to it. Hidden files
    and folders are left out, so an index or thumbnail cache kept inside the folder is never indexed."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        found += [
            (rel / f).as_posix()
            for f in filenames
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def build_from_folder(
    model: Any,
    images_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    mode: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> BuildReport:
    """Create or update the index at ``out_path`` so it holds exactly the readable images under ``images_dir``.

    Only new or changed files are embedded. ``mode`` ("flat" or "hnsw") applies to a new index (default flat); an
    existing index keeps its own, and a different ``mode`` raises. Unreadable files are skipped and reported, and one
    that was indexed before is removed. The index is saved atomically, with ``build.json``."""
    root = Path(images_dir)
    files = list_images(root)
    index = _open_or_create(model, out_path, mode)
    if not files and len(index):
        # An empty (e.g. unmounted) folder would otherwise remove every item: refuse instead of wiping.
        raise ValueError(f"{root}: no images found; refusing to remove all {len(index)} items of {out_path}")
    report = BuildReport(Path(out_path))
    start = time.perf_counter()
    with tqdm(total=len(files), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True) as bar:
        for lo in range(0, len(files), batch_size):
            ids = files[lo : lo + batch_size]
            step = index.add_images([root / i for i in ids], ids=ids, batch_size=batch_size)
            report.added += step.added
            report.unchanged += step.unchanged
            report.skipped += step.skipped
            bar.update(len(ids))
    # A file that became unreadable keeps no stale vector: the index mirrors what the folder holds now.
    keep = set(files) - {i for i, _ in report.skipped}
    report.removed = sorted(i for i in index.ids() if i not in keep)
    index.remove(report.removed)
    report.seconds = time.perf_counter() - start
    _save(index, model, {"images": str(root.resolve())})
    return report


# ---- shards ------------------------------------------------------------------------------------------------------
def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """The shards one rank embeds: every ``world_size``-th from ``rank``; with fewer shards than ranks, rank 0 takes
    them all (splitting inside a shard would make every rank read all of them)."""
    if len(urls) >= world_size:
        return urls[rank::world_size]
    return list(urls) if rank == 0 else []


def _sample_metadata(raw_json: str, caption: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw_json) if raw_json else {}
    except json.JSONDecodeError:
        meta = {}
    return {**(meta if isinstance(meta, dict) else {"json": meta}), "caption": caption}


def _embed_shards(model: Any, urls: list[str], batch_size: int, workers: int, progress: bool) -> tuple:
    """(ids, (N, E) float32 vectors, metadata, bad-sample count, sources) of the given shards."""
    import torch

    from mmfusion.data import ShardStream, make_loader

    ids, vecs, metas, bad, sources = [], [], [], 0, []
    if urls:
        stream = ShardStream(urls, batch_size, model.transform, model.tokenizer, train=False)
        with torch.no_grad(), tqdm(unit="img", desc="embedding", disable=not progress, dynamic_ncols=True) as bar:
            for batch in make_loader(stream, workers):
                bad += batch["skipped"]
                if not batch["key"]:  # a batch that only reports skipped samples
                    continue
                emb = model.model.encode_image(batch["image"].to(model.device))  # (B, E), L2-normalised
                vecs.append(emb.float().cpu().numpy())
                ids += batch["key"]
                metas += [_sample_metadata(j, c) for j, c in zip(batch["json"], batch["caption"], strict=True)]
                # Where to re-read the image from, e.g. to rerank: the shard and the sample's key.
                sources += [
                    {"kind": "shard", "url": u, "key": k} for u, k in zip(batch["url"], batch["key"], strict=True)
                ]
                bar.update(len(batch["key"]))
    dim = int(model.embed_dim)
    return ids, np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32), metas, bad, sources


def _merge(parts: list[tuple], pattern: str) -> tuple[list[str], np.ndarray, list[dict], list[dict], list[tuple]]:
    """All ranks' (ids, vectors, metadata, sources) as one set fit for the index, and what was left out and why."""
    ids = [i for p in parts for i in p[0]]
    vectors = np.concatenate([p[1] for p in parts])  # (N, E)
    metas = [m for p in parts for m in p[2]]
    sources = [s for p in parts for s in p[4]]
    skipped = []
    if bad := sum(p[3] for p in parts):
        skipped.append((pattern, f"{bad} unreadable or incomplete samples"))
    last = {id_: row for row, id_ in enumerate(ids)}  # a key seen twice keeps its later sample
    skipped += [(id_, "duplicate key: the later sample is kept") for row, id_ in enumerate(ids) if last[id_] != row]
    rows = [r for r in sorted(last.values()) if np.isfinite(vectors[r]).all()]
    skipped += [(ids[r], "embedding is not finite") for r in sorted(set(last.values()) - set(rows))]
    return [ids[r] for r in rows], vectors[rows], [metas[r] for r in rows], [sources[r] for r in rows], skipped


def build_from_shards(
    model: Any,
    pattern: str,
    out_path: str | os.PathLike,
    dist: Any = None,
    mode: str | None = None,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool = True,
) -> BuildReport:
    """Index every sample of the shards matching ``pattern``: id = ``__key__``, metadata = its json plus
    ``"caption"``. An existing index at ``out_path`` (same model) ends up holding exactly these samples.

    Under torchrun pass ``dist`` (:class:`mmfusion.train.dist.Dist`): ranks embed disjoint shards, rank 0 gathers and
    writes, and every rank waits for that. Rank 0's report covers all ranks; the others' only their own samples.
    The vectors travel to rank 0 through ``all_gather_object`` (pickled), which suits up to a few million of them."""
    from mmfusion.data import expand_shards
    from mmfusion.train.dist import all_gather_object, barrier

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    urls = expand_shards(pattern)
    check_target(model, out_path, mode)  # on every rank, so a bad target stops them all before any work
    start = time.perf_counter()
    local = _embed_shards(model, rank_shards(urls, rank, world), batch_size, workers, progress and rank == 0)
    parts = all_gather_object(dist, local) if dist is not None else [local]
    report = BuildReport(Path(out_path))
    if rank != 0:
        report.added, report.seconds = local[0], time.perf_counter() - start
        barrier(dist)
        return report
    ids, vectors, metas, sources, report.skipped = _merge(parts, pattern)
    report.seconds = time.perf_counter() - start
    index = _open_or_create(model, out_path, mode)
    report.added = ids
    report.removed = sorted(set(index.ids()) - set(ids))
    index.remove(report.removed)
    index.add_embeddings(ids, vectors, metas, sources=sources)
    _save(index, model, {"shards": pattern})
    if dist is not None:
        barrier(dist)
    return report


# ---- querying ----------------------------------------------------------------------------------------------------
def search(
    index: SearchIndex,
    *,
    text: str | None = None,
    image: str | os.PathLike | None = None,
    audio: str | os.PathLike | None = None,
    k: int = 10,
    rerank: bool = False,
) -> list[Hit]:
    """Top-``k`` hits for one text, image file or audio file (exactly one), best first. A bad query raises
    ``ValueError`` or ``FileNotFoundError`` with a message naming it; so does an empty index. ``rerank`` (text
    only): see :meth:`SearchIndex.search`. Audio queries need a model with an audio tower (``encode_audio``)."""
    if sum(q is not None for q in (text, image, audio)) != 1:
        raise ValueError("give exactly one query: text, image or audio")
    if len(index) == 0:
        raise ValueError(f"index {index.path} is empty: nothing to search")
    if audio is not None:
        if rerank:
            raise ValueError("--rerank needs a text query: the matching head scores image-caption pairs")
        if not Path(audio).is_file():
            raise FileNotFoundError(f"query audio {shown_path(str(audio))}: no such file")
        if not hasattr(index.model, "encode_audio"):
            raise ValueError("this model cannot embed audio")
        # AudioLoadError (a ValueError) names the file when it is not readable audio.
        return index.search(to_numpy(index.model.encode_audio([str(audio)]))[0], k)
    if text is not None:
        if not text.strip():
            raise ValueError("the query text is empty")
        if rerank:
            return index.search(text, k, rerank=True)
        # Embedded here rather than passed as a string: the index reads a string naming an image file as that image.
        return index.search(to_numpy(index.model.encode_text([text]))[0], k)
    if rerank:
        raise ValueError("--rerank needs a text query: the matching head scores image-caption pairs")
    path = Path(image)
    if not path.is_file():  # Path("") is ".": name what the user typed
        raise FileNotFoundError(f"query image {shown_path(str(image))}: no such file")
    try:
        picture = load_image(path)
    except Exception as e:  # any decoder failure means "not an image" to the user
        raise ValueError(f"query image {path} is not a readable image ({type(e).__name__}: {e})") from None
    return index.search(picture, k)
