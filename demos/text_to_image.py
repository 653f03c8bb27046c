#!/usr/bin/env python
"""Write a grid of generated images for a few prompts (one row per prompt) with a text_to_image checkpoint.

python demos/text_to_image.py --checkpoint runs/NAME --out demo.png
python demos/text_to_image.py --checkpoint runs/NAME "a large green star on the left" "a small cyan heart at the top"
"""

from __future__ import annotations

import argparse
import sys

PROMPTS = (
    "a red circle in the top left",
    "a large blue square in the center",
    "a small yellow star at the bottom right",
    "a green heart on the right",
    "a purple star in the center",  # purple star is a held-out combination: never seen in training
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help=f"prompts (default: {len(PROMPTS)} built-in ones)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--n", type=int, default=6, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", default="text_to_image.png")
    args = parser.parse_args(argv)

    import mmfusion
    from mmfusion.data.writer import save_image_grid

    model = mmfusion.load(args.checkpoint)
    prompts = args.prompts or list(PROMPTS)
    images = model.generate(prompts, n=args.n, guidance=args.guidance, seed=args.seed)
    save_image_grid(images, args.out, columns=args.n)
    for row, prompt in enumerate(prompts):
        print(f"row {row + 1}: {prompt}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
