#!/usr/bin/env python
"""Generate images from a text prompt with a checkpoint trained by a text_to_image recipe (configs/tiny-gen.yaml).

Writes one PNG grid (n images, left to right, top to bottom) atomically to --out. Bad prompts (empty, longer than the
model's text context, not valid UTF-8) are a one-line error and exit code 2.

examples:
  python tools/generate.py --checkpoint runs/NAME --text "a small red star in the top left" --n 8 --out s.png
  python tools/generate.py --checkpoint runs/NAME --text "a blue circle" --guidance 1.0 --out plain.png
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory of a text_to_image recipe, or a checkpoint")
    parser.add_argument("--text", required=True, help="the prompt")
    parser.add_argument("--n", type=int, default=8, help="images to generate (default 8)")
    parser.add_argument(
        "--steps", type=int, help="parallel decoding steps of a masked generator (default 8; autoregressive: none)"
    )
    parser.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: the checkpoint's config)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, help="draw from the k most probable codes, 0 = all (default: config)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same images")
    parser.add_argument("--out", default="samples.png", help="PNG file for the grid (default samples.png)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mmfusion
    from mmfusion.cli import error_line, setup_logging
    from mmfusion.data.writer import save_image_grid
    from mmfusion.train.checkpoint import CheckpointError

    setup_logging()
    try:
        model = mmfusion.load(args.checkpoint, device=args.device)
        model.check_prompt(args.text)
        images = model.generate(
            args.text, n=args.n, steps=args.steps, guidance=args.guidance, temperature=args.temperature,
            top_k=args.top_k, seed=args.seed,
        )  # fmt: skip
        save_image_grid(images, args.out)
    except (CheckpointError, ValueError, OSError) as exn:
        print(f"error: {error_line(exn)}", file=sys.stderr)
        return 2
    print(f"wrote {len(images)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
