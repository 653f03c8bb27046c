"""On-disk index format: crash-safe generations under one directory, switched by an atomic manifest replace.

Layout of ``photos.idx/``::

    manifest.json          {"format", "format_version", "generation", "model_fingerprint", "embed_dim", "count",
                            "mode", "hnsw", "next_faiss_id", "files": {name: {"size", "sha256"}}}
    gen-<time>-<rand>/     one complete, immutable index generation
        items.sqlite       table items(row, id, faiss_id, metadata JSON, source JSON), row order = vector order
        vectors.npy        (count, embed_dim) float32, flat mode; faiss is rebuilt from it on open (a memcpy)
        hnsw.faiss         faiss.write_index of the IndexHNSWFlat, hnsw mode; holds the vectors and the graph,
                           whose rebuild would take minutes at 1M vectors

Save protocol (why a crash at any instant leaves the old or the new index loadable): every new file is written
into ``.tmp-<gen>/``, fsynced, the directory renamed to ``gen-<gen>`` and the parent fsynced; only then is a new
manifest written to a temporary name, fsynced and ``os.replace``d over ``manifest.json`` (atomic on POSIX and
Windows). Until that replace the old manifest points at the old, untouched generation; after it, the new one is
complete on disk. Old generations and temporary leftovers are deleted afterwards, best effort.

Load protocol: the manifest is schema-checked, then each file's size and sha256 are verified *before* numpy,
sqlite or faiss parse it, so truncation or bit rot surfaces as :class:`IndexCorruptError` naming the file.

One writer process per index directory (a second writer's garbage collection could delete the first's
in-progress generation). Readers in other processes are fine.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .errors import IndexCorruptError
from .store import StoreState

FORMAT = "mmfusion-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS, VECTORS, GRAPH = "items.sqlite", "vectors.npy", "hnsw.faiss"
_CHUNK = 1 << 20
_REQUIRED = {
    "format": str,
    "format_version": int,
    "generation": str,
    "embed_dim": int,
    "count": int,
    "mode": str,
    "hnsw": dict,
    "next_faiss_id": int,
    "files": dict,
}


@dataclass
class Loaded:
    manifest: dict[str, Any]
    state: StoreState


class _HashingWriter:
    """File wrapper hashing bytes as numpy writes them, so the checksum needs no second pass over the file."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.size += len(b)
        return self.f.write(b)


def _sha256(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync_path(path: Path) -> None:
    # Every durability point goes through here (tests inject failures at each). Directories need an fsync too,
    # or a rename may not survive power loss; Windows cannot open directories, so it skips those.
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- writing -----------------------------------------------------------------------------------------------------
def write_vectors(path: Path, vectors: np.ndarray) -> dict[str, Any]:
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        np.save(w, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
    _fsync_path(path)
    return {"size": w.size, "sha256": w.h.hexdigest()}


def write_items(path: Path, state: StoreState) -> dict[str, Any]:
    con = sqlite3.connect(path)
    try:
        # No journal: this file is brand new and only becomes visible through the manifest swap.
        con.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;")
        con.execute(
            "CREATE TABLE items (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, faiss_id INTEGER NOT NULL, "
            "metadata TEXT, source TEXT)"
        )
        rows = (
            (r, i, f, json.dumps(m) if m else None, json.dumps(s) if s else None)
            for r, (i, f, m, s) in enumerate(
                zip(state.ids, state.faiss_ids.tolist(), state.metadata, state.sources, strict=True)
            )
        )
        con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", rows)
        con.commit()
    finally:
        con.close()
    return _file_entry(path)


def write_graph(path: Path, index: Any) -> dict[str, Any]:
    faiss.write_index(index, str(path))
    return _file_entry(path)


def _file_entry(path: Path) -> dict[str, Any]:
    _fsync_path(path)
    size, digest = _sha256(path)
    return {"size": size, "sha256": digest}


def write_index(root: Path, state: StoreState, header: dict[str, Any]) -> str:
    """Write ``state`` as a new generation of the index at ``root`` and switch to it. Returns the generation."""
    root.mkdir(parents=True, exist_ok=True)
    gen = f"gen-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
    try:
        tmp_manifest = _prepare_generation(root, gen, state, header)
        os.replace(tmp_manifest, root / MANIFEST)  # the commit point; atomic, so if it raises it did not happen
    except BaseException:
        # Nothing references the new files yet; the old manifest and generation were never touched.
        for leftover in (root / f".tmp-{gen}", root / gen, root / f".tmp-{gen}-{MANIFEST}"):
            _remove(leftover)
        raise
    _fsync_path(root)
    collect_garbage(root, keep=gen)
    return gen


def _prepare_generation(root: Path, gen: str, state: StoreState, header: dict[str, Any]) -> Path:
    """Write and fsync the generation directory and a temporary manifest; returns the manifest's temp path."""
    tmp = root / f".tmp-{gen}"
    tmp.mkdir()
    files = {ITEMS: write_items(tmp / ITEMS, state)}
    if state.vectors is not None:
        files[VECTORS] = write_vectors(tmp / VECTORS, state.vectors)
    if state.faiss_index is not None:
        files[GRAPH] = write_graph(tmp / GRAPH, state.faiss_index)
    _fsync_path(tmp)
    os.rename(tmp, root / gen)
    _fsync_path(root)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generation": gen,
        **header,
        "count": len(state.ids),
        "next_faiss_id": state.next_faiss_id,
        "files": files,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp_manifest = root / f".tmp-{gen}-{MANIFEST}"
    tmp_manifest.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync_path(tmp_manifest)
    return tmp_manifest


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    except OSError:
        pass  # e.g. a reader on Windows holds a file open; the next save retries


def collect_garbage(root: Path, keep: str) -> None:
    """Delete generations other than ``keep`` and temporary leftovers of interrupted saves. Never raises."""
    for entry in root.iterdir():
        if entry.name != keep and entry.name.startswith(("gen-", ".tmp-gen-")):
            _remove(entry)


# ---- reading -----------------------------------------------------------------------------------------------------
def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"no index directory at {root}")
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not an index: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexCorruptError(f"corrupt index manifest {path}: {e}") from e
    problems = _manifest_problems(manifest)
    if problems:
        raise IndexCorruptError(f"corrupt index manifest {path}: {problems}")
    return manifest


def _manifest_problems(m: Any) -> str:
    if not isinstance(m, dict):
        return "not a JSON object"
    for key, typ in _REQUIRED.items():
        if not isinstance(m.get(key), typ):
            return f"field {key!r} missing or not {typ.__name__}"
    if m["format"] != FORMAT:
        return f"format is {m['format']!r}, expected {FORMAT!r}"
    if m["format_version"] != FORMAT_VERSION:
        return f"format_version {m['format_version']} is not supported (this code reads {FORMAT_VERSION})"
    if not m["generation"].startswith("gen-") or "/" in m["generation"] or "\\" in m["generation"]:
        return f"bad generation name {m['generation']!r}"
    if m["mode"] not in ("flat", "hnsw") or m["embed_dim"] <= 0 or m["count"] < 0:
        return "bad mode, embed_dim or count"
    if not all(isinstance(m["hnsw"].get(k), int) and m["hnsw"][k] > 0 for k in ("m", "ef_construction", "ef_search")):
        return "hnsw parameters missing or not positive integers"
    need = [ITEMS, VECTORS if m["mode"] == "flat" else GRAPH]
    for name in need:
        entry = m["files"].get(name)
        ok = isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        if not ok:
            return f"files entry for {name!r} missing or malformed"
    return ""


def _verified(root: Path, manifest: dict[str, Any], name: str) -> Path:
    """Path of a generation file whose size and sha256 match the manifest, else IndexCorruptError."""
    path = root / manifest["generation"] / name
    want = manifest["files"][name]
    try:
        size = path.stat().st_size
    except OSError as e:
        raise IndexCorruptError(f"index file {path} is missing or unreadable: {e}") from e
    if size != want["size"]:
        raise IndexCorruptError(f"index file {path} is {size} bytes, manifest says {want['size']} (truncated?)")
    if _sha256(path)[1] != want["sha256"]:
        raise IndexCorruptError(f"index file {path} fails its sha256 checksum (corrupted)")
    return path


def read_items(root: Path, manifest: dict[str, Any]) -> StoreState:
    """Ids, faiss ids, metadata and sources (no vectors) of the manifest's generation."""
    path = _verified(root, manifest, ITEMS)
    try:
        con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            rows = con.execute("SELECT id, faiss_id, metadata, source FROM items ORDER BY row").fetchall()
        finally:
            con.close()
        ids = [r[0] for r in rows]
        state = StoreState(
            ids=ids,
            faiss_ids=np.array([r[1] for r in rows], dtype=np.int64),
            metadata=[json.loads(r[2]) if r[2] else None for r in rows],
            sources=[json.loads(r[3]) if r[3] else None for r in rows],
            vectors=None,
            faiss_index=None,
            next_faiss_id=manifest["next_faiss_id"],
        )
    except (sqlite3.Error, ValueError, TypeError) as e:
        raise IndexCorruptError(f"index file {path} cannot be read: {e}") from e
    if len(ids) != manifest["count"] or not all(isinstance(i, str) for i in ids):
        raise IndexCorruptError(f"index file {path} holds {len(ids)} items, manifest says {manifest['count']}")
    return state


def read_vectors(root: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Memory-mapped (count, embed_dim) float32 vectors, checksum-verified."""
    path = _verified(root, manifest, VECTORS)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise IndexCorruptError(f"index file {path} is not a valid .npy file: {e}") from e
    want = (manifest["count"], manifest["embed_dim"])
    if arr.dtype != np.float32 or arr.shape != want:
        raise IndexCorruptError(f"index file {path} holds {arr.dtype}{arr.shape}, expected float32{want}")
    return arr


def read_graph(root: Path, manifest: dict[str, Any]) -> Any:
    path = _verified(root, manifest, GRAPH)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise IndexCorruptError(f"index file {path} is not a readable faiss index: {e}") from e
    ok = isinstance(index, faiss.IndexHNSWFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT
    if not ok or index.d != manifest["embed_dim"]:
        raise IndexCorruptError(f"index file {path} is not an IndexHNSWFlat of width {manifest['embed_dim']}")
    return index


def read_index(root: Path, manifest: dict[str, Any]) -> Loaded:
    """Load a full generation: items plus vectors (flat) or graph (hnsw)."""
    state = read_items(root, manifest)
    if manifest["mode"] == "flat":
        state.vectors = read_vectors(root, manifest)
    else:
        state.faiss_index = read_graph(root, manifest)
    return Loaded(manifest, state)
