#!/usr/bin/env python
"""Caption images with a checkpoint trained with the fusion head (model.fusion.enabled=true).

Prints one caption per input image, in the order given. Every input is read before any captioning: if one is
missing or not an image, a one-line error per bad file goes to stderr, nothing to stdout, and the exit code is 2.

examples:
  python tools/caption.py --checkpoint runs/tiny-fusion photo1.jpg photo2.png
  python tools/caption.py --checkpoint runs/tiny-fusion photo.jpg --beam 3
  python tools/caption.py --checkpoint runs/tiny-fusion photo.jpg --top-p 0.9 --seed 0
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint directory")
    search = parser.add_mutually_exclusive_group()
    search.add_argument("--beam", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    search.add_argument("--top-p", type=float, help="nucleus sampling: sample from the top-p probability mass")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --top-p)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --top-p sampling (default 0)")
    parser.add_argument("--max-length", type=int, help="most tokens per caption (default: the text context - 1)")
    parser.add_argument("--min-length", type=int, default=0, help="fewest tokens per caption")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    parser.add_argument("--no-repeat-ngram", type=int, default=4, help="ban repeating n-grams of this size (0: off)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mmfusion
    from mmfusion.cli import error_line, setup_logging, shown_path
    from mmfusion.data import load_image
    from mmfusion.train.checkpoint import CheckpointError

    setup_logging()
    images, errors = [], []
    for path in args.images:
        try:
            images.append(load_image(path))
        except Exception as exn:  # missing, unreadable, or not an image at all
            errors.append(f"error: {shown_path(path)}: not a readable image ({error_line(exn)})")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 2
    try:
        model = mmfusion.load(args.checkpoint, device=args.device)
        captions = model.caption(
            images,
            beam=args.beam,
            top_p=args.top_p,
            temperature=args.temperature,
            seed=args.seed,
            max_length=args.max_length,
            min_length=args.min_length,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram=args.no_repeat_ngram,
        )
    except (CheckpointError, ValueError) as exn:
        print(f"error: {error_line(exn)}", file=sys.stderr)
        return 2
    print("\n".join(captions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
