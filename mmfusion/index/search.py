"""``SearchIndex``: a persistent, model-aware nearest-neighbour index over images, texts and raw embeddings.

Scores are inner products; with the L2-normalised embeddings of a CLIP-style model (Radford et al., 2021) they
are cosine similarities. The model is duck-typed (:class:`ModelLike`), so this package imports no model code.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import persist
from .errors import IndexCorruptError, ModelMismatchError
from .inputs import (
    AddReport,
    ModelLike,
    Row,
    check_ids,
    embed,
    encode_rows,
    image_source,
    is_image_path,
    load_image,
    load_source_images,
    metadata_list,
    to_numpy,
)
from .store import AUTO_COMPACT_RATIO, Hit, HNSWParams, Record, VectorStore, as_matrix, clean_metadata

log = logging.getLogger(__name__)
RERANK_CANDIDATES = 10  # contrastive top-n that reranking rescores, when more than k


class SearchIndex:
    """Vectors + string ids + metadata in faiss and SQLite, searchable by text, image or embedding.

    Build with :meth:`create` or :meth:`open`, not the constructor.

    Locking: one readers-writer lock per index guards the faiss index and the id/metadata maps. ``search``,
    ``get_record``, ``save`` (while it writes files) take it shared, so any number of threads search at once
    (faiss releases the GIL); ``add_*``, ``remove`` and ``compact`` take it exclusively, but only for the faiss
    mutation: image loading and model encoding happen before, unlocked, so searches keep flowing during long
    adds. A waiting writer holds back new readers so it cannot starve. Concurrent saves are serialised by a
    second lock; the model's own thread safety is the model's business.
    """

    def __init__(self, store: VectorStore, model: ModelLike | None, fingerprint: str | None, path: Path | None):
        self._store, self.model, self.fingerprint = store, model, fingerprint
        self.path = path
        self.reembed_report: AddReport | None = None  # set by open(..., reembed=True)
        self._save_lock = threading.Lock()

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        model: ModelLike | None,
        path: str | os.PathLike | None = None,
        *,
        mode: str = "flat",
        embed_dim: int | None = None,
        m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 64,
    ) -> SearchIndex:
        """A new, empty, unsaved index. ``mode`` is "flat" (exact) or "hnsw" (approximate, for large collections;
        ``m``, ``ef_construction``, ``ef_search`` are the HNSW knobs). ``model=None`` needs ``embed_dim`` and
        limits queries to embeddings."""
        if model is None and embed_dim is None:
            raise ValueError("pass a model or embed_dim")
        dim = int(model.embed_dim if model is not None else embed_dim)
        fp = model.fingerprint if model is not None else None
        store = VectorStore(dim, mode, HNSWParams(m, ef_construction, ef_search))
        return cls(store, model, fp, Path(path) if path is not None else None)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model: ModelLike | None = None,
        *,
        reembed: bool = False,
        ef_search: int | None = None,
    ) -> SearchIndex:
        """Load a saved index. A model whose fingerprint differs from the one recorded raises
        :class:`ModelMismatchError` unless ``reembed=True``: then every item is re-embedded from its stored source
        (image file or text); items without one, or whose file is gone, are dropped and listed in
        ``index.reembed_report.skipped``. Nothing on disk changes until :meth:`save`."""
        root = Path(path)
        manifest = persist.read_manifest(root)
        hnsw = HNSWParams(**{k: v for k, v in manifest["hnsw"].items() if k in ("m", "ef_construction", "ef_search")})
        if ef_search is not None:
            hnsw = HNSWParams(hnsw.m, hnsw.ef_construction, ef_search)
        recorded = manifest.get("model_fingerprint")
        if model is not None and (recorded != model.fingerprint or int(model.embed_dim) != manifest["embed_dim"]):
            if not reembed:
                raise ModelMismatchError(
                    f"index {root} was built with model fingerprint {recorded!r} (embed_dim {manifest['embed_dim']})"
                    f" but the given model has {model.fingerprint!r} (embed_dim {model.embed_dim}); open it with the"
                    " model that built it, or pass reembed=True to re-embed from the stored image paths and texts"
                )
            return cls._reembedded(root, manifest, model, hnsw)
        loaded = persist.read_index(root, manifest)
        try:
            store = VectorStore.restore(manifest["embed_dim"], manifest["mode"], hnsw, loaded.state)
        except (ValueError, AssertionError) as e:
            raise IndexCorruptError(f"index {root} is inconsistent: {e}") from e
        return cls(store, model, recorded, root)

    @classmethod
    def _reembedded(cls, root: Path, manifest: dict, model: ModelLike, hnsw: HNSWParams) -> SearchIndex:
        state = persist.read_items(root, manifest)
        index = cls.create(
            model, root, mode=manifest["mode"], m=hnsw.m, ef_construction=hnsw.ef_construction, ef_search=hnsw.ef_search
        )
        report = AddReport()
        images: list[tuple[str, str, Any]] = []
        texts: list[tuple[str, str, Any]] = []
        for id_, meta, src in zip(state.ids, state.metadata, state.sources, strict=True):
            kind = (src or {}).get("kind")
            if kind == "image" and isinstance(src.get("path"), str):
                images.append((id_, src["path"], meta))
            elif kind == "text" and isinstance(src.get("text"), str):
                texts.append((id_, src["text"], meta))
            else:
                report.skipped.append((id_, "no stored source to re-embed from (added as an embedding or PIL image)"))
        for group, add in ((images, index.add_images), (texts, index.add_texts)):
            if group:
                ids, items, metas = map(list, zip(*group, strict=True))
                sub = add(items, metas, ids=ids)
                report.added += sub.added
                report.skipped += sub.skipped
        index.reembed_report = report
        log.info("re-embedded %s with model %s: %s", root, model.fingerprint, report)
        return index

    # ---- adding ------------------------------------------------------------------------------------------------
    def add_embeddings(
        self,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        sources: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Add (N, D) vectors under string ids; an id already present is replaced, metadata and source included.
        Vectors are stored as given: pass L2-normalised ones for cosine scores."""
        ids = list(ids)
        vecs = as_matrix(vectors, self.embed_dim)
        metas = metadata_list(metadata, len(ids))
        srcs = [clean_metadata(s) for s in sources] if sources is not None else [None] * len(ids)
        if not (len(ids) == len(vecs) == len(srcs)):
            raise ValueError(f"got {len(ids)} ids, {len(vecs)} vectors and {len(srcs)} sources")
        check_ids(ids)
        self._store.upsert(ids, vecs, metas, srcs)

    def add_images(
        self,
        images: Sequence[str | os.PathLike | Image.Image],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        ids: Sequence[str] | None = None,
        incremental: bool = True,
        batch_size: int = 64,
    ) -> AddReport:
        """Embed and add image files or PIL images. Ids default to ``str(path)``; PIL images need ``ids``.
        Paths record a source (absolute path, mtime, size); with ``incremental`` a file whose source is unchanged
        is not re-embedded. Unreadable files are skipped and reported, never raised."""
        self._need_model()
        images = list(images)
        if ids is None:
            if any(isinstance(im, Image.Image) for im in images):
                raise ValueError("PIL images have no path to use as id: pass ids=")
            ids = [str(im) for im in images]
        ids = list(ids)
        metas = metadata_list(metadata, len(images))
        if len(ids) != len(images):
            raise ValueError(f"got {len(images)} images but {len(ids)} ids")
        check_ids(ids)
        report, todo = AddReport(), []
        for id_, item, meta in zip(ids, images, metas, strict=True):
            src = None
            if not isinstance(item, Image.Image):
                try:
                    src = image_source(item)
                except OSError as e:
                    report.skipped.append((id_, f"{type(e).__name__}: {e}"))
                    continue
                if incremental and id_ in self._store and self._store.source(id_) == src:
                    report.unchanged.append(id_)
                    continue
            todo.append((id_, item, meta, src))
        if report.unchanged:
            unchanged = set(report.unchanged)
            self._store.update_metadata(
                report.unchanged, [m for i, m in zip(ids, metas, strict=True) if i in unchanged]
            )
        for lo in range(0, len(todo), batch_size):
            self._add_image_batch(todo[lo : lo + batch_size], report)
        if report.skipped:
            log.warning("add_images skipped %d unreadable items, e.g. %s", len(report.skipped), report.skipped[0])
        return report

    def _add_image_batch(self, batch: list[tuple], report: AddReport) -> None:
        loaded = []
        for id_, item, meta, src in batch:
            try:
                loaded.append((id_, load_image(item), meta, src))
            except Exception as e:  # any decoder failure (truncated, bomb, odd format) must not stop a build
                report.skipped.append((id_, f"cannot read image: {type(e).__name__}: {e}"))
        self._encode_and_add(self._need_model().encode_image, loaded, report)

    def _encode_and_add(self, encode: Callable, rows: list[Row], report: AddReport) -> None:
        for kept, vecs in encode_rows(encode, rows, self.embed_dim, report):
            self._store.upsert([r[0] for r in kept], vecs, [r[2] for r in kept], [r[3] for r in kept])
            report.added += [r[0] for r in kept]

    def add_texts(
        self,
        texts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        ids: Sequence[str] | None = None,
        batch_size: int = 256,
    ) -> AddReport:
        """Embed and add texts (e.g. captions, for image-to-text search). Ids default to the texts themselves."""
        self._need_model()
        texts = list(texts)
        ids = list(ids) if ids is not None else texts
        metas = metadata_list(metadata, len(texts))
        if len(ids) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(ids)} ids")
        check_ids(ids)
        report = AddReport()
        rows = [(i, t, m, {"kind": "text", "text": t}) for i, t, m in zip(ids, texts, metas, strict=True)]
        for lo in range(0, len(rows), batch_size):
            self._encode_and_add(self._need_model().encode_text, rows[lo : lo + batch_size], report)
        return report

    # ---- searching ---------------------------------------------------------------------------------------------
    def search(
        self,
        query: Any,
        k: int = 10,
        *,
        where: Callable[[Mapping[str, Any]], bool] | None = None,
        rerank: bool = False,
        rerank_candidates: int = RERANK_CANDIDATES,
    ) -> list[Hit] | list[list[Hit]]:
        """Top-``k`` hits, best first. ``query`` is a text, a PIL image, an image path (a ``Path``, or a ``str``
        naming an existing file with an image suffix; other strings are text), a 1-D embedding (-> list of hits),
        or a batch: a 2-D embedding or a list of any of those (-> list of lists). ``where`` filters on metadata.

        ``rerank=True`` (text queries only) takes the contrastive top ``max(k, rerank_candidates)``, re-reads their
        images and orders them by ``model.rerank_scores(images, text, cosines)`` (for mmfusion models: the fusion
        head's matching logit plus the contrastive logit); hit scores are then those scores. Candidates whose image
        cannot be re-read (entries added as raw embeddings, remote shards) follow the reranked ones, keeping their
        order, with score -inf, and a warning says how many."""
        if rerank:
            return self._reranked(query, k, where, rerank_candidates)
        if isinstance(query, (list, tuple)):
            if not query:
                return []
            return self._store.search(self._embed_queries(list(query)), k, where)
        if (hasattr(query, "detach") or isinstance(query, np.ndarray)) and query.ndim == 2:
            return self._store.search(as_matrix(query, self.embed_dim, "query"), k, where)
        return self._store.search(self._embed_queries([query]), k, where)[0]

    def _embed_queries(self, queries: list) -> np.ndarray:
        """(Q, D) query matrix; texts and images are encoded in one model call per kind."""
        out = np.empty((len(queries), self.embed_dim), np.float32)
        texts, images = [], []
        for i, q in enumerate(queries):
            if hasattr(q, "detach") or isinstance(q, np.ndarray):
                out[i] = as_matrix(np.reshape(to_numpy(q), (1, -1)), self.embed_dim, "query")[0]
            elif isinstance(q, Image.Image) or isinstance(q, os.PathLike) or (isinstance(q, str) and is_image_path(q)):
                images.append((i, q))
            elif isinstance(q, str):
                texts.append((i, q))
            else:
                raise TypeError(f"cannot search with a {type(q).__name__} (pass embeddings as arrays)")
        if texts:
            out[[i for i, _ in texts]] = embed(self._need_model().encode_text, [t for _, t in texts], self.embed_dim)
        if images:
            loaded = [load_image(q) for _, q in images]  # a query that cannot be read is the caller's error
            out[[i for i, _ in images]] = embed(self._need_model().encode_image, loaded, self.embed_dim)
        return out

    def _reranked(self, query: Any, k: int, where: Callable | None, candidates: int) -> list[Hit] | list[list[Hit]]:
        if isinstance(query, (list, tuple)):
            return [self._reranked(q, k, where, candidates) for q in query]
        if not isinstance(query, str) or is_image_path(query):
            raise ValueError("rerank=True needs a text query: the matching head scores image-caption pairs")
        model = self._need_model()
        if not hasattr(model, "rerank_scores"):
            raise ValueError("rerank=True needs a model with a matching head (train with model.fusion.enabled=true)")
        hits = self._store.search(self._embed_queries([query]), max(k, candidates), where)[0]
        images, readable, unreadable = [], [], []
        for hit, image in zip(hits, load_source_images([self._store.source(h.id) for h in hits]), strict=True):
            if isinstance(image, Exception):  # a moved file or a raw-embedding entry must not fail the search
                log.debug("cannot rerank %s: %s", hit.id, image)
                unreadable.append(hit)
            else:
                images.append(image)
                readable.append(hit)
        if unreadable:
            log.warning(
                "reranking skipped %d of %d candidates whose image cannot be re-read", len(unreadable), len(hits)
            )
        cosines = np.array([h.score for h in readable], np.float32)
        scores = to_numpy(model.rerank_scores(images, query, cosines)).reshape(-1) if images else []
        order = sorted(range(len(readable)), key=lambda i: -float(scores[i]))
        reranked = [Hit(readable[i].id, float(scores[i]), readable[i].metadata) for i in order]
        return (reranked + [Hit(h.id, float("-inf"), h.metadata) for h in unreadable])[:k]

    # ---- everything else ---------------------------------------------------------------------------------------
    def remove(self, ids: str | Iterable[str]) -> int:
        """Remove items by id (a single id or many); unknown ids are ignored. Returns how many were removed."""
        return self._store.remove([ids] if isinstance(ids, str) else list(ids))

    def get_record(self, id: str) -> Record:
        """Metadata and source of ``id``; KeyError if absent."""
        return self._store.record(id)

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored (N, D) vectors of ``ids``; KeyError if one is absent."""
        return self._store.vectors(list(ids))

    def ids(self) -> list[str]:
        """All ids, in no particular order."""
        return self._store.ids()

    def compact(self) -> None:
        """Rebuild the HNSW graph without removed items (save does it once they pass 25%)."""
        self._store.compact()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Atomically write the index to ``path`` (default: where it was opened or created) and remember it."""
        root = Path(path) if path is not None else self.path
        if root is None:
            raise ValueError("this index has no path yet: call save(path)")
        with self._save_lock:
            if self._store.tombstone_ratio > AUTO_COMPACT_RATIO:
                self._store.compact()
            h = self._store.hnsw
            header = {
                "model_fingerprint": self.fingerprint,
                "embed_dim": self.embed_dim,
                "mode": self.mode,
                "hnsw": {"m": h.m, "ef_construction": h.ef_construction, "ef_search": h.ef_search},
            }
            with self._store.lock.read():
                persist.write_index(root, self._store.state(), header)
            self.path = root
        return root

    @property
    def embed_dim(self) -> int:
        return self._store.dim

    @property
    def mode(self) -> str:
        return self._store.mode

    @property
    def ef_search(self) -> int:
        return self._store.hnsw.ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        h = self._store.hnsw
        self._store.hnsw = HNSWParams(h.m, h.ef_construction, int(value))

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._store

    def __repr__(self) -> str:
        return f"SearchIndex({len(self)} items, mode={self.mode}, dim={self.embed_dim}, path={self.path})"

    def _need_model(self) -> ModelLike:
        if self.model is None:
            raise TypeError("this index has no model: only embedding queries and add_embeddings work")
        return self.model
