"""Persistent nearest-neighbour search over model embeddings: faiss vectors + SQLite metadata, crash-safe saves.

>>> index = SearchIndex.create(model)
>>> index.add_images(paths, metadata=[{"label": "star"}, ...])
>>> index.search("a red circle", k=5, where=lambda meta: meta.get("label") == "star")
>>> index.save("photos.idx")

Works on numpy arrays and string ids; the model is duck-typed (:class:`ModelLike`), never imported.
"""

from .errors import IndexCorruptError, ModelMismatchError
from .search import AddReport, ModelLike, SearchIndex
from .store import Hit, Record

__all__ = ["AddReport", "Hit", "IndexCorruptError", "ModelLike", "ModelMismatchError", "Record", "SearchIndex"]
