#!/usr/bin/env python
"""Pack captioned images, optionally with audio, into webdataset shards (img2dataset/open_clip convention).

Two inputs:
  --images DIR     every image under DIR with a sidecar caption file of the same stem (cat.jpg + cat.txt)
  --table FILE     a .csv with a header (path,caption[,audio][,more columns]) or a .jsonl of
                   {"path", "caption", ["audio",] ...}; relative paths are resolved against the table's folder

The optional audio column names a WAV or FLAC file, stored as-is as the sample's .wav or .flac member
(by its suffix, any case); an empty cell means that sample has no audio.

Unreadable images, images without a caption and rows whose audio is missing, unreadable or not
WAV/FLAC are skipped, listed at the end (one line per bad file), and counted; shards are written
atomically, so an interrupted run leaves no half-written shard.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images with sidecar .txt captions")
    source.add_argument("--table", help="csv or jsonl with path and caption columns, optionally audio")
    parser.add_argument("--out", required=True, help="output folder for 000000.tar, 000001.tar, ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    from pathlib import Path

    from tqdm import tqdm

    from mmfusion.data.writer import folder_items, table_items, write_shards

    source_path = Path(args.images or args.table)
    if args.images and not source_path.is_dir():
        print(f"error: {source_path}: not a folder", file=sys.stderr)
        return 2
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"error: {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    if args.table and not source_path.is_file():
        print(f"error: {source_path}: no such file", file=sys.stderr)
        return 2
    try:
        items = list(folder_items(source_path) if args.images else table_items(source_path))
    except (ValueError, KeyError, OSError) as exn:
        print(f"error: {source_path}: {exn}", file=sys.stderr)
        return 2
    if not items:
        print(f"error: {source_path}: no images found", file=sys.stderr)
        return 2
    with tqdm(total=len(items), unit="img", desc="packing") as bar:
        report = write_shards(items, args.out, args.samples_per_shard, progress=bar)
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    last = len(report.shards) - 1
    pattern = f"{args.out}/{{000000..{last:06d}}}.tar" if report.shards else "(none)"
    print(f"wrote {report.written} samples in {len(report.shards)} shards: {pattern}; skipped {len(report.skipped)}")
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
