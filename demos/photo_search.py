#!/usr/bin/env python
"""Photo search in the terminal: index a folder of images (only new or changed files are embedded), then ask.

    python demos/photo_search.py ~/Pictures --checkpoint runs/tiny
    query> a red circle at the top left
    query> ~/Pictures/holiday/beach.jpg        (an image file: finds similar photos)

Prints the top 5 for each query; an empty line or Ctrl-D ends it. The index lives next to the folder (PHOTOS.idx).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import mmfusion
from mmfusion import SearchIndex
from mmfusion.index.build import build_from_folder, search


def answer(index: SearchIndex, query: str, k: int = 5) -> None:
    path = Path(query).expanduser()
    try:
        hits = search(index, image=path, k=k) if path.is_file() else search(index, text=query, k=k)
    except (OSError, ValueError) as exn:  # a bad query is reported and the session goes on
        print(f"  error: {exn}")
        return
    for hit in hits:
        print(f"  {hit.score:.3f}  {hit.id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of photos, searched recursively")
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--index", help="index directory (default: FOLDER.idx next to the folder)")
    args = parser.parse_args(argv)
    folder = Path(args.folder).expanduser().resolve()
    index_path = Path(args.index) if args.index else folder.with_name(folder.name + ".idx")
    logging.getLogger("mmfusion.index").setLevel(logging.ERROR)  # skipped files are listed below instead
    try:
        model = mmfusion.load(args.checkpoint)
        report = build_from_folder(model, folder, index_path)
        index = SearchIndex.open(index_path, model)
    except (OSError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(report, *(f"skipped {id_}: {reason}" for id_, reason in report.skipped), sep="\n")
    while True:
        try:
            query = input("query> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not query:
            break
        answer(index, query)
    return 0


if __name__ == "__main__":
    sys.exit(main())
