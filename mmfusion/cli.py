"""Small helpers shared by the command-line tools: logging setup and one-line error messages."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool = False) -> None:
    """Warnings from everyone, INFO from mmfusion when ``verbose``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmfusion").setLevel(logging.INFO if verbose else logging.WARNING)


def shown_path(path: str) -> str:
    """A path as an error line names it: quoted when empty or blank, so "error: : ..." never reaches a user."""
    return path if path.strip() else repr(path)


def error_line(exn: BaseException) -> str:
    """One line for a CLI: the error's own message, also when it was re-raised from a DataLoader worker
    (whose message carries the worker's whole traceback and ends with the original error)."""
    lines = [line.strip() for line in str(exn).splitlines() if line.strip()]
    if not lines:
        return type(exn).__name__
    if "Original Traceback" in str(exn):
        return lines[-1].split(": ", 1)[-1]
    return lines[0]
