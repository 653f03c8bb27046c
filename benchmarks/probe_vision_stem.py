#!/usr/bin/env python
"""How fast the image tower learns *where* an object is and *what shape* it is, under direct supervision.

Not a speed benchmark: a learning probe behind ``model.vision.stem``. A tiny ViT (the ``tiny`` config's tower) with
a linear head on its CLS token is trained from scratch to classify the position (9 cells) and shape (8 classes) of
single-object synthetic scenes, the attributes the fusion head's captions keep missing. If the tower cannot learn
them even with a label per image, no caption decoder on top of it can. Batch 64, AdamW, warmup then cosine, bf16
autocast where the CPU computes it natively (else fp32, as ``train.precision=auto``); accuracy on 500 held-out val
renders. The printed seconds let tower widths be compared at equal time as well as at equal steps.

    python benchmarks/probe_vision_stem.py                       # patch and conv stems, 300 steps, ~6 min on 2 cores
    python benchmarks/probe_vision_stem.py --stems conv --patch 16 --widths 256 128
    python benchmarks/probe_vision_stem.py --stems conv --patch 16 --widths 128 --depth 3 --stem-width 256 \
        --full-res-widths 0 8                                    # the tiny tower with and without a stride-1 conv
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from mmfusion.config import VisionConfig
from mmfusion.data.synthetic import POSITIONS, SHAPES, render_scene, sample_scene
from mmfusion.models.vision import VisionTower
from mmfusion.train.precision import ComputeContext

CELLS = [cell for row in POSITIONS for cell in row]


def single_object_scenes(n: int, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` single-object renders of ``split`` as (N, 3, 64, 64) in [-1.7, 1.9], position and shape labels."""
    rng = np.random.default_rng([seed, 0x57E4])
    images, cells, shapes = [], [], []
    while len(images) < n:
        scene = sample_scene(rng, split)
        if scene["n_objects"] != 1:
            continue
        obj = scene["objects"][0]
        images.append(np.asarray(render_scene(scene, 64)))
        cells.append(CELLS.index(obj["position"]))
        shapes.append(SHAPES.index(obj["shape"]))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - 0.45) / 0.27, torch.tensor(cells), torch.tensor(shapes)


def probe(vision: VisionConfig, steps: int, train, val, lr: float, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    tower = VisionTower(vision, embed_dim=256)
    compute = ComputeContext(torch.device("cpu"), "auto")  # the training loop's precision and attention kernel
    head = torch.nn.Linear(tower.cfg.width, len(CELLS) + len(SHAPES))
    params = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    rng = np.random.default_rng(seed)

    def logits(images: torch.Tensor) -> torch.Tensor:
        with compute:
            return head(tower.forward_features(images)[:, 0]).float()  # (B, 9 + 8), from the CLS token

    start = time.perf_counter()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(step / 50, 0.5 * (1 + math.cos(math.pi * step / steps)))
        rows = torch.from_numpy(rng.integers(0, len(train[0]), 64))
        out = logits(train[0][rows])
        loss = F.cross_entropy(out[:, : len(CELLS)], train[1][rows]) + F.cross_entropy(
            out[:, len(CELLS) :], train[2][rows]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    tower.eval()
    with torch.no_grad():
        out = torch.cat([logits(val[0][i : i + 250]) for i in range(0, len(val[0]), 250)])
    return {
        "position_acc": 100.0 * (out[:, : len(CELLS)].argmax(1) == val[1]).float().mean().item(),
        "shape_acc": 100.0 * (out[:, len(CELLS) :].argmax(1) == val[2]).float().mean().item(),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stems", nargs="+", default=["patch", "conv"], choices=["patch", "conv"])
    parser.add_argument("--patch", type=int, default=8, help="patch size (token grid = 64 / patch)")
    parser.add_argument("--widths", type=int, nargs="+", default=[256], help="tower widths (multiples of 4 heads)")
    parser.add_argument("--depth", type=int, default=6, help="tower depth")
    parser.add_argument("--stem-width", type=int, default=0, help="vision.stem_width of the conv stem (0: width/2)")
    parser.add_argument(
        "--full-res-widths", type=int, nargs="+", default=[0], help="vision.stem_full_res_width values (0: none)"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-scenes", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.patch < 1 or 64 % args.patch or args.patch & (args.patch - 1):
        parser.error(f"--patch must be a power of two that divides 64, got {args.patch}")
    if any(w < 4 or w % 4 for w in args.widths):
        parser.error(f"--widths must be positive multiples of 4 (the tower's heads), got {args.widths}")
    if args.depth < 1 or args.stem_width < 0 or any(w < 0 for w in args.full_res_widths):
        parser.error("--depth must be >= 1, --stem-width and --full-res-widths >= 0")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    train = single_object_scenes(args.train_scenes, "train", args.seed)
    val = single_object_scenes(500, "val", args.seed)
    results = {}
    for stem in args.stems:
        for width in args.widths:
            for full_res in args.full_res_widths if stem == "conv" else [0]:
                vision = VisionConfig(
                    stem=stem,
                    patch_size=args.patch,
                    width=width,
                    depth=args.depth,
                    stem_width=args.stem_width,
                    stem_full_res_width=full_res,
                )
                name = f"{stem}-{width}" + (f"-fullres{full_res}" if full_res else "")
                r = results[name] = probe(vision, args.steps, train, val, args.lr, args.seed)
                print(
                    f"{stem:>5} stem, width {width}, patch {args.patch}, full-res {full_res}, {args.steps} steps: "
                    f"position {r['position_acc']:.1f}%  shape {r['shape_acc']:.1f}%  ({r['seconds']:.0f} s)",
                    flush=True,
                )
    print(json.dumps({"patch": args.patch, "steps": args.steps, "lr": args.lr, **results}))


if __name__ == "__main__":
    main()
