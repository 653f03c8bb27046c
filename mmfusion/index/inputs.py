"""Turning user inputs into what the store takes: the duck-typed model contract, image loading, id and metadata
checks, and batch encoding that isolates the one bad input instead of failing the batch.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .store import clean_metadata

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class ModelLike(Protocol):
    """What the index needs from a model: ``encode_*`` return (B, D) float32 L2-normalised tensors or arrays."""

    embed_dim: int
    fingerprint: str  # hash of checkpoint weights + config

    def encode_image(self, images: list) -> Any: ...

    def encode_text(self, texts: list[str]) -> Any: ...


@dataclass
class AddReport:
    """Outcome of an add: ``added`` were embedded and stored (new or replaced); ``unchanged`` had the same source
    file (path, mtime, size) as already indexed, so only their metadata was refreshed; ``skipped`` holds
    ``(id, reason)`` for items that could not be read or embedded (ids default to the paths)."""

    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"added {len(self.added)}, unchanged {len(self.unchanged)}, skipped {len(self.skipped)}"


Row = tuple[str, Any, "dict[str, Any] | None", "dict[str, Any] | None"]  # (id, input, metadata, source)


def embed(encode: Callable[[list], Any], inputs: list, dim: int) -> np.ndarray:
    """Call a model encoder and check it returned (len(inputs), dim)."""
    out = np.ascontiguousarray(to_numpy(encode(inputs)), dtype=np.float32)
    if out.shape != (len(inputs), dim):
        raise ValueError(f"model returned shape {out.shape}, expected ({len(inputs)}, {dim})")
    return out


def encode_rows(
    encode: Callable[[list], Any], rows: list[Row], dim: int, report: AddReport
) -> Iterator[tuple[list[Row], np.ndarray]]:
    """Yield (rows, (len(rows), dim) vectors): one model call for the batch; if that fails, one call per row so the
    culprit is reported in ``report.skipped`` and the rest are kept. Rows with non-finite embeddings are skipped."""
    if not rows:
        return
    try:
        parts = [(rows, embed(encode, [r[1] for r in rows], dim))]
    except Exception:  # retried per item below, where the failure is attributed
        parts = []
        for r in rows:
            try:
                parts.append(([r], embed(encode, [r[1]], dim)))
            except Exception as e:
                report.skipped.append((r[0], f"model failed to encode it: {type(e).__name__}: {e}"))
    for group, vecs in parts:
        ok = np.isfinite(vecs).all(1)
        report.skipped += [(r[0], "embedding is not finite") for r, good in zip(group, ok, strict=True) if not good]
        yield [r for r, good in zip(group, ok, strict=True) if good], vecs[ok]


def metadata_list(metadata: Sequence[Mapping[str, Any] | None] | None, n: int) -> list[dict[str, Any] | None]:
    if metadata is None:
        return [None] * n
    if isinstance(metadata, Mapping):
        raise TypeError("metadata is one dict per item: pass a list")
    metas = [clean_metadata(m) for m in metadata]
    if len(metas) != n:
        raise ValueError(f"got {n} items but {len(metas)} metadata entries")
    return metas


def check_ids(ids: list[str]) -> None:
    if not all(isinstance(i, str) for i in ids):
        raise TypeError("ids must be strings")
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate id in one call: {dup!r}")


def to_numpy(x: Any) -> np.ndarray:
    # Duck-typed torch support: this package must not import torch.
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def is_image_path(q: str) -> bool:
    return Path(q).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(q)


def load_image(item: str | os.PathLike | Image.Image) -> Image.Image:
    """Decode now, inside the caller's error handling, not lazily inside the model. The mode is kept:
    the model's own preprocessing composites transparency and applies EXIF rotation."""
    if isinstance(item, Image.Image):
        return item
    with Image.open(item) as im:
        im.load()
        return im.copy()


def image_source(path: str | os.PathLike) -> dict[str, Any]:
    """The record an incremental build compares: a changed mtime or size means re-embed. Raises OSError."""
    st = os.stat(path)
    return {"kind": "image", "path": str(Path(path).resolve()), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def load_source_images(sources: Sequence[Mapping[str, Any] | None]) -> list[Image.Image | Exception]:
    """Re-read the images entries were embedded from, in order: files (``{"kind": "image", "path"}``) or samples in
    local webdataset shards (``{"kind": "shard", "url", "key"}``, each shard scanned once for all its keys). Where
    an image cannot be read (an entry added from raw embeddings, a remote shard, a moved file) the list holds the
    error instead."""
    out: list[Image.Image | Exception] = [ValueError("no readable image source for this entry")] * len(sources)
    wanted: dict[str, dict[str, int]] = {}  # shard url -> key -> position
    for i, source in enumerate(sources):
        kind = (source or {}).get("kind")
        if kind == "image":
            try:
                out[i] = load_image(source["path"])
            except Exception as e:  # a moved or broken file: reported per entry
                out[i] = e
        elif kind == "shard" and os.path.isfile(source.get("url", "")):
            wanted.setdefault(source["url"], {})[source["key"]] = i
    for url, keys in wanted.items():
        try:
            with tarfile.open(url) as tar:  # headers only: uncompressed members are skipped by seeking
                for member in tar:
                    stem, _, ext = member.name.rpartition(".")
                    if stem in keys and "." + ext.lower() in IMAGE_SUFFIXES:
                        out[keys.pop(stem)] = load_image(io.BytesIO(tar.extractfile(member).read()))
                        if not keys:
                            break
        except Exception as e:  # truncated or unreadable shard
            for i in keys.values():
                out[i] = e
            continue
        for key, i in keys.items():
            out[i] = ValueError(f"sample {key} has no image in {url}")
    return out
