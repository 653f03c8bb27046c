#!/usr/bin/env python
"""Build or update a search index of image embeddings, from a folder of images or from webdataset shards.

A folder build is incremental: run it again after adding, changing or deleting photos and only those are
(re-)embedded or removed; ids are the files' paths relative to the folder. A shard build indexes every sample under
its key, with the sample's json and caption as metadata, and runs under torchrun to split the shards over ranks.

examples:
  python tools/build_index.py --checkpoint runs/tiny --images ~/Pictures --out photos.idx
  python tools/build_index.py --checkpoint runs/tiny --shards "heldout/*.tar" --out heldout.idx --mode hnsw
  torchrun --nproc_per_node=4 tools/build_index.py --checkpoint runs/base --shards "s/{000..099}.tar" --out s.idx

Prints one summary line (added/unchanged/removed/skipped, images/s), then one line per skipped file.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of images, searched recursively")
    source.add_argument("--shards", metavar="PATTERN", help='shard pattern, e.g. "heldout/*.tar" or "s/{000..009}.tar"')
    parser.add_argument("--out", required=True, help="index directory to create or update, e.g. photos.idx")
    parser.add_argument("--mode", choices=["flat", "hnsw"], help="new index: flat (exact, default) or hnsw (large)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="shard decoding processes per rank (--shards)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (under torchrun: each rank's GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmfusion.index").setLevel(logging.ERROR)  # skipped files are listed below, one per line
    import mmfusion
    from mmfusion.index.build import build_from_folder, build_from_shards
    from mmfusion.train.dist import init_dist, shutdown

    dist = init_dist(args.device)
    from mmfusion.cli import error_line

    try:
        if args.images and dist.enabled:
            raise ValueError("--images runs in one process: use torchrun only with --shards")
        model = mmfusion.load(args.checkpoint, device=str(dist.device))
        if args.images:
            report = build_from_folder(model, args.images, args.out, args.mode, args.batch_size, not args.no_progress)
        else:
            progress = not args.no_progress
            report = build_from_shards(
                model, args.shards, args.out, dist, args.mode, args.batch_size, args.workers, progress
            )
    except (OSError, ValueError) as exn:  # checkpoint, shard and index errors are all ValueErrors
        print(f"error: {error_line(exn)}", file=sys.stderr)
        return 2
    finally:
        shutdown(dist)
    if dist.is_main:
        print(report)
        for id_, reason in report.skipped:
            print(f"skipped {id_}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
