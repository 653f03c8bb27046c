"""Test helpers: run the tools' main(argv) in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"


def load_tool(name: str, folder: Path = TOOLS):
    """``tools/<name>.py`` (or ``<folder>/<name>.py``, e.g. a demo) as a module."""
    spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
