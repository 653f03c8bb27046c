"""In-memory vector store: a faiss index keyed by stable string ids, with per-item metadata and source records.

The store knows nothing about models or files; ``search.py`` embeds, ``persist.py`` reads and writes.

* ``flat``: exact inner product, ``IndexIDMap2(IndexFlatIP)``. Removal is real (faiss compacts the array, so
  rows move; the IDMap's int64 ids, drawn from a counter that never reuses a value, stay put).
* ``hnsw``: approximate, ``IndexHNSWFlat(M, METRIC_INNER_PRODUCT)`` (Malkov & Yashunin, 2016). A graph never
  moves or deletes nodes, so the node's position *is* its int64 id and no IDMap is needed (an IDMap would cost a
  hash map and an OpenMP pass per search). A removed or replaced item becomes a *tombstone*: its position goes in
  a set that every search excludes with a faiss ``IDSelector``. Excluding inside the graph walk (instead of
  over-fetching and dropping afterwards) keeps k results and recall intact however many tombstones there are.
  Rebuilding the graph costs minutes at a million vectors, so it is deferred to :meth:`VectorStore.compact`
  (which renumbers positions), run by the index on save once tombstones pass ``AUTO_COMPACT_RATIO``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import faiss
import numpy as np

from .rwlock import RWLock

MODES = ("flat", "hnsw")
AUTO_COMPACT_RATIO = 0.25
# Below this many allowed items a filtered search is answered exactly from the reconstructed vectors: an HNSW
# walk degrades when few nodes pass the filter, and a small matmul beats scanning every vector in flat mode.
SUBSET_EXACT_MAX = 20_000
_EMPTY: Mapping[str, Any] = MappingProxyType({})  # what a `where` predicate sees for items without metadata
_ADD_CHUNK = 65_536  # rows per faiss add when restoring, so a memory-mapped file is never copied whole


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result; ``metadata`` is a shallow copy of the stored dict."""

    id: str
    score: float
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Record:
    """Everything stored for an id except its vector. ``source`` says where the vector came from (or None)."""

    id: str
    metadata: dict[str, Any]
    source: dict[str, Any] | None


@dataclass(frozen=True)
class HNSWParams:
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 64


@dataclass
class StoreState:
    """A consistent view of the store for persistence; valid only while the read lock is held."""

    ids: list[str]
    faiss_ids: np.ndarray  # (N,) int64, row order of `vectors`
    metadata: list[dict[str, Any] | None]
    sources: list[dict[str, Any] | None]
    vectors: np.ndarray | None  # (N, D) float32 view of faiss memory (flat mode)
    faiss_index: Any | None  # the HNSW index, tombstones included (hnsw mode)
    next_faiss_id: int


def clean_metadata(meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """JSON round-trip ``meta`` so what a search returns now equals what it returns after save/open."""
    if not meta:
        return None
    if not isinstance(meta, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from e


def as_matrix(x: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """Numpy or torch (duck-typed, so this package never imports torch) -> C-contiguous float32 (N, dim)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} must have shape (N, {dim}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or inf")
    return arr


class VectorStore:
    """Vectors, id maps, metadata and sources behind one readers-writer lock (see ``SearchIndex`` for the rules)."""

    def __init__(self, dim: int, mode: str = "flat", hnsw: HNSWParams | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {dim}")
        self.dim, self.mode, self.hnsw = dim, mode, hnsw or HNSWParams()
        self.lock = RWLock()
        self._index = self._new_index()
        self._fid: dict[str, int] = {}  # string id -> faiss id
        self._sid: dict[int, str] = {}  # faiss id -> string id
        self._meta: dict[str, dict[str, Any]] = {}  # sparse: items without metadata are absent
        self._source: dict[str, dict[str, Any]] = {}  # sparse
        self._tombstones: set[int] = set()  # hnsw only: faiss ids still in the graph but dead
        self._tomb_sel: tuple[Any, Any] | None = None  # cached (Not, Batch) selectors; both kept alive here
        self._next_fid = 0

    def _new_index(self) -> Any:
        if self.mode == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        base = faiss.IndexHNSWFlat(self.dim, self.hnsw.m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = self.hnsw.ef_construction
        base.hnsw.efSearch = self.hnsw.ef_search
        return base

    # ---- reads -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._fid)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._fid

    def ids(self) -> list[str]:
        with self.lock.read():
            return list(self._fid)

    def record(self, id_: str) -> Record:
        with self.lock.read():
            if id_ not in self._fid:
                raise KeyError(id_)
            return Record(id_, dict(self._meta.get(id_, {})), self._source.get(id_))

    def source(self, id_: str) -> dict[str, Any] | None:
        return self._source.get(id_)

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        with self.lock.read():
            fids = np.array([self._fid[i] for i in ids], dtype=np.int64)
            return self._index.reconstruct_batch(fids) if len(fids) else np.zeros((0, self.dim), np.float32)

    @property
    def tombstone_ratio(self) -> float:
        return len(self._tombstones) / max(1, self._index.ntotal)

    # ---- writes ------------------------------------------------------------------------------------------------
    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[dict[str, Any] | None],
        sources: Sequence[dict[str, Any] | None],
    ) -> None:
        """Add items; an existing id is replaced (vector, metadata and source). Inputs are already validated."""
        if not ids:
            return
        with self.lock.write():
            old = [self._fid[i] for i in ids if i in self._fid]
            # Add before removing: if faiss raises here the store is unchanged.
            if self.mode == "flat":
                new = np.arange(self._next_fid, self._next_fid + len(ids), dtype=np.int64)
                self._index.add_with_ids(vectors, new)
                self._next_fid += len(ids)
            else:
                new = np.arange(self._index.ntotal, self._index.ntotal + len(ids), dtype=np.int64)
                self._index.add(vectors)
            self._drop_fids(old)
            for i, f, m, s in zip(ids, new.tolist(), metadata, sources, strict=True):
                self._fid[i], self._sid[f] = f, i
                self._set(self._meta, i, m)
                self._set(self._source, i, s)

    def update_metadata(self, ids: Sequence[str], metadata: Sequence[dict[str, Any] | None]) -> None:
        with self.lock.write():
            for i, m in zip(ids, metadata, strict=True):
                if i not in self._fid:
                    raise KeyError(i)
                self._set(self._meta, i, m)

    def remove(self, ids: Sequence[str]) -> int:
        """Remove the given ids; unknown ids are ignored. Returns how many were removed."""
        with self.lock.write():
            present = list(dict.fromkeys(i for i in ids if i in self._fid))
            self._drop_fids([self._fid[i] for i in present])
            for i in present:
                del self._fid[i]
                self._meta.pop(i, None)
                self._source.pop(i, None)
            return len(present)

    def compact(self) -> None:
        """Rebuild the HNSW graph without tombstones (no-op for flat or when there are none)."""
        with self.lock.write():
            if not self._tombstones:
                return
            all_fids, vecs = self._stored_rows()
            live = all_fids[~np.isin(all_fids, np.fromiter(self._tombstones, np.int64))]
            index = self._new_index()
            index.add(np.ascontiguousarray(vecs[live]))
            self._sid = {new: self._sid[old] for new, old in enumerate(live.tolist())}
            self._fid = {sid: new for new, sid in self._sid.items()}
            self._index, self._tombstones, self._tomb_sel = index, set(), None

    @staticmethod
    def _set(d: dict[str, Any], key: str, value: Any) -> None:
        if value:
            d[key] = value
        else:
            d.pop(key, None)

    def _drop_fids(self, fids: list[int]) -> None:
        # Caller holds the write lock.
        if not fids:
            return
        for f in fids:
            del self._sid[f]
        if self.mode == "flat":
            self._index.remove_ids(np.array(fids, dtype=np.int64))  # one O(N) compaction per call, so batch
        else:
            self._tombstones.update(fids)
            self._tomb_sel = None

    def _stored_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(faiss ids, vectors) of every row faiss holds, tombstones included; vectors are a view."""
        n = self._index.ntotal
        if self.mode == "flat":
            flat = faiss.downcast_index(self._index.index)
            fids = faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        else:
            flat, fids = faiss.downcast_index(self._index.storage), np.arange(n, dtype=np.int64)
        vecs = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim) if n else np.zeros((0, self.dim))
        return fids, vecs

    # ---- search ------------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, where: Callable[[Mapping[str, Any]], bool] | None = None) -> list:
        """Top-``k`` hits per query row, best first. ``where`` sees each item's metadata and must not mutate it."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        with self.lock.read():
            nq = queries.shape[0]
            if not self._fid:
                return [[] for _ in range(nq)]
            if where is None:
                scores, labels = self._index.search(queries, k, params=self._params(self._tombstone_selector(), k))
                return self._hits(scores, labels)
            allowed = np.fromiter((f for i, f in self._fid.items() if where(self._meta.get(i, _EMPTY))), dtype=np.int64)
            if allowed.size == 0:
                return [[] for _ in range(nq)]
            if allowed.size <= SUBSET_EXACT_MAX:
                return self._hits(*self._exact_subset(queries, k, allowed))
            batch = faiss.IDSelectorBatch(allowed)
            scores, labels = self._index.search(queries, k, params=self._params(batch, k))
            short = (labels >= 0).sum(1) < min(k, allowed.size)
            if short.any():  # the graph walk ran out of allowed nodes: answer those queries exactly
                scores[short], labels[short] = self._exact_subset(queries[short], k, allowed)
            return self._hits(scores, labels)

    def _params(self, sel: Any, k: int) -> Any:
        # A fresh object per call: IndexIDMap swaps `sel` on it during search, so a shared one is not thread-safe.
        # efSearch goes here too, not on the index, so concurrent searches with different k don't interfere.
        if self.mode == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(self.hnsw.ef_search, k)
        elif sel is None:
            return None
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    def _tombstone_selector(self) -> Any:
        if not self._tombstones:
            return None
        if self._tomb_sel is None:  # built lazily under the read lock; a race only builds it twice
            batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64))
            self._tomb_sel = (faiss.IDSelectorNot(batch), batch)
        return self._tomb_sel[0]

    def _exact_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vecs = self._index.reconstruct_batch(allowed)  # (A, D)
        sims = queries @ vecs.T  # (Q, A)
        kk = min(k, allowed.size)
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]  # (Q, kk) unordered
        top_s = np.take_along_axis(sims, top, 1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        scores = np.full((len(queries), k), -np.inf, np.float32)
        labels = np.full((len(queries), k), -1, np.int64)
        scores[:, :kk] = np.take_along_axis(top_s, order, 1)
        labels[:, :kk] = allowed[np.take_along_axis(top, order, 1)]
        return scores, labels

    def _hits(self, scores: np.ndarray, labels: np.ndarray) -> list[list[Hit]]:
        sids, metas = self._sid, self._meta  # locals: this loop runs k times per query
        out = []
        for srow, lrow in zip(scores.tolist(), labels.tolist(), strict=True):
            row = []
            for s, f in zip(srow, lrow, strict=True):
                if f < 0:
                    break  # faiss pads with -1 when fewer than k items qualify
                sid = sids[f]
                m = metas.get(sid)
                row.append(Hit(sid, s, dict(m) if m else {}))
            out.append(row)
        return out

    # ---- persistence hooks -------------------------------------------------------------------------------------
    def state(self) -> StoreState:
        """Snapshot for saving. Call with ``self.lock.read()`` held; vectors are views into faiss memory."""
        all_fids, vecs = self._stored_rows()
        if self.mode == "hnsw":
            live = [f for f in all_fids.tolist() if f not in self._tombstones]
            fids, vectors, index = np.array(live, dtype=np.int64), None, self._index
        else:
            fids, vectors, index = all_fids, vecs, None
        ids = [self._sid[f] for f in fids.tolist()]
        return StoreState(
            ids=ids,
            faiss_ids=fids,
            metadata=[self._meta.get(i) for i in ids],
            sources=[self._source.get(i) for i in ids],
            vectors=vectors,
            faiss_index=index,
            next_faiss_id=self._next_fid,
        )

    @classmethod
    def restore(cls, dim: int, mode: str, hnsw: HNSWParams, state: StoreState) -> VectorStore:
        """Rebuild a store from loaded state: flat re-adds the vectors, hnsw adopts the loaded graph."""
        store = cls(dim, mode, hnsw)
        fids = state.faiss_ids
        if len(set(state.ids)) != len(state.ids) or len(np.unique(fids)) != len(fids):
            raise ValueError("duplicate ids")
        if mode == "flat":
            assert state.vectors is not None
            for lo in range(0, len(fids), _ADD_CHUNK):
                chunk = np.ascontiguousarray(state.vectors[lo : lo + _ADD_CHUNK], dtype=np.float32)
                store._index.add_with_ids(chunk, fids[lo : lo + _ADD_CHUNK])
        else:
            store._index = state.faiss_index
            n = store._index.ntotal
            if len(fids) and (fids.min() < 0 or fids.max() >= n):
                raise ValueError(f"items point outside the {n}-node graph")
            store._tombstones = set(np.setdiff1d(np.arange(n), fids).tolist())
        held = store._stored_rows()[0]  # tombstoned ids too: a new item must never reuse one
        store._next_fid = max(state.next_faiss_id, int(held.max()) + 1 if len(held) else 0)
        for i, f, m, s in zip(state.ids, fids.tolist(), state.metadata, state.sources, strict=True):
            store._fid[i], store._sid[f] = f, i
            cls._set(store._meta, i, m)
            cls._set(store._source, i, s)
        return store
