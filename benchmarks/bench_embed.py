"""Benchmark image embedding throughput (images/s) on a folder of N synthetic PNGs, with a freshly created model.

Three figures, each over the same files:

* ``decode_model``: ``MMFusion.encode_image(paths)``: decode + preprocess + model, in the calling thread;
* ``model_only``: the model on pre-decoded, pre-transformed (B, 3, S, S) tensors, the ceiling for any pipeline;
* ``build_index``: ``build_from_folder`` into a new index (decode + model + faiss add, save excluded).

``decode_model`` well below ``model_only`` means decoding is the bottleneck: that is why shard builds decode in
loader workers. Human-readable lines first; the last line is one JSON object with every figure.

    python benchmarks/bench_embed.py                  # N=512, the tiny config, CPU
    python benchmarks/bench_embed.py --n 64 --threads 1
    python benchmarks/bench_embed.py --model small --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mmfusion
from mmfusion.api import MMFusion
from mmfusion.data.synthetic import render_scene, sample_scene
from mmfusion.index.build import build_from_folder


def make_folder(root: Path, n: int, image_size: int, seed: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        scene = sample_scene(np.random.default_rng([seed, i]), "val")
        paths.append(root / f"{i:06d}.png")
        render_scene(scene, image_size).save(paths[-1])
    return paths


def rate(n: int, fn) -> float:
    """Images per second of one call of ``fn`` over ``n`` images; CUDA work is waited for."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512, help="number of images")
    p.add_argument("--model", default="tiny", help="shipped config name (weights are random: speed only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = mmfusion.load_config(args.model)
    model = MMFusion(mmfusion.create_model(config.model), config, device=args.device)
    size, bs = config.model.vision.image_size, args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        paths = make_folder(Path(tmp) / "images", args.n, size, args.seed)
        model.encode_image(paths[:bs], batch_size=bs)  # warm-up: allocator, kernels, thread pool
        out = {"decode_model": rate(args.n, lambda: model.encode_image(paths, batch_size=bs))}
        pixels = torch.stack([model.preprocess(p) for p in paths]).to(model.device)  # (N, 3, S, S)

        @torch.no_grad()
        def model_only() -> None:
            for lo in range(0, args.n, bs):
                model.model.encode_image(pixels[lo : lo + bs])  # (B, E)

        out["model_only"] = rate(args.n, model_only)
        report = build_from_folder(model, Path(tmp) / "images", Path(tmp) / "bench.idx", batch_size=bs, progress=False)
        out["build_index"] = report.images_per_s
    for name, value in out.items():
        print(f"{name:>13s}: {value:8.1f} images/s")
    print(f"decoding costs {100 * (1 - out['decode_model'] / out['model_only']):.0f}% of the model-only rate")
    summary = {
        "images_per_s": out,
        "n": args.n,
        "model": args.model,
        "image_size": size,
        "batch_size": bs,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
