#!/usr/bin/env python
"""Write a grid of generated images for a few prompts (one row per prompt) with a text_to_image checkpoint, and a
grid of held-out synthetic images (top row) with their reconstructions through the image tokenizer (bottom row).

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
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the checkpoint's config)")
    parser.add_argument("--top-k", type=int, help="draw among the k most probable codes (default: the config's)")
    parser.add_argument("--out", default="text_to_image.png")
    parser.add_argument("--recon-out", default="reconstructions.png", help="tokenizer round trip grid ('' = skip)")
    args = parser.parse_args(argv)

    import mmfusion
    from mmfusion.data.writer import save_image_grid

    model = mmfusion.load(args.checkpoint)
    prompts = args.prompts or list(PROMPTS)
    images = model.generate(prompts, n=args.n, guidance=args.guidance, top_k=args.top_k, seed=args.seed)
    save_image_grid(images, args.out, columns=args.n)
    for row, prompt in enumerate(prompts):
        print(f"row {row + 1}: {prompt}")
    print(f"wrote {args.out}")
    if args.recon_out:
        import io

        from PIL import Image

        from mmfusion.data.synthetic import make_sample

        originals = [Image.open(io.BytesIO(make_sample(i, "val", seed=0)["png"])) for i in range(8)]
        tokens = model.tokenize_image(originals)  # (8, h, w)
        save_image_grid(
            [im.convert("RGB") for im in originals] + model.decode_tokens(tokens), args.recon_out, columns=8
        )
        print(f"wrote {args.recon_out} (top: held-out images; bottom: decoded from {tuple(tokens.shape[1:])} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
