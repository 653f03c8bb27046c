#!/usr/bin/env python
"""Search an index built by tools/build_index.py with a text, an image or a sound; prints the best hits, best first.

Each line is "score  id  metadata" (metadata as JSON, when the item has any); --json prints one JSON list of
{"id", "score", "metadata"} instead. The checkpoint defaults to the one that built the index.

examples:
  python tools/retrieve.py --index photos.idx --text "a red circle at the top"
  python tools/retrieve.py --index photos.idx --image query.jpg --k 5 --json
  python tools/retrieve.py --index photos.idx --audio bark.wav --k 5      # needs a model with an audio tower
  python tools/retrieve.py --index photos.idx --text "a red circle" --rerank   # needs a fusion-head model
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="index directory, e.g. photos.idx")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", metavar="FILE", help="find images like this one")
    query.add_argument("--text", metavar="TEXT", help="find images matching this description")
    query.add_argument("--audio", metavar="FILE", help="find images that sound like this WAV/FLAC clip")
    parser.add_argument("--k", type=int, default=10, help="number of hits (default 10)")
    parser.add_argument(
        "--rerank",
        action="store_true",
        help="text queries: rescore the contrastive top 10 (or top k) with the fusion head's matching score",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    parser.add_argument("--checkpoint", help="run or checkpoint directory (default: the one that built the index)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import mmfusion
    from mmfusion.cli import error_line
    from mmfusion.index import SearchIndex
    from mmfusion.index.build import read_build_info, search

    try:
        info = read_build_info(args.index)  # first: a missing index is reported before any model loads
        checkpoint = args.checkpoint or info.get("checkpoint")
        if not checkpoint:
            raise ValueError(f"index {args.index} does not record the checkpoint that built it: pass --checkpoint")
        model = mmfusion.load(checkpoint, device=args.device)
        index = SearchIndex.open(args.index, model)
        hits = search(index, text=args.text, image=args.image, audio=args.audio, k=args.k, rerank=args.rerank)
    except (OSError, ValueError) as exn:  # missing index or query file, bad query, checkpoint or model mismatch
        print(f"error: {error_line(exn)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits]))
    else:
        for h in hits:
            meta = json.dumps(h.metadata, sort_keys=True) if h.metadata else ""
            print(f"{h.score:.4f}  {h.id}  {meta}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
