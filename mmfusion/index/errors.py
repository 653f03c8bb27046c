"""Errors raised by the search index.

Both subclass ``ValueError`` so callers that already guard index loading with ``except ValueError`` keep working.
"""

from __future__ import annotations


class IndexCorruptError(ValueError):
    """An index file is missing, truncated, fails its checksum, or does not match the manifest.

    The message names the offending file. Raised before any bytes reach faiss, so a damaged index never
    crashes the interpreter.
    """


class ModelMismatchError(ValueError):
    """The index was built with a different model (fingerprint or embedding width) than the one given."""
