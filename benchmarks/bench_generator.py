#!/usr/bin/env python
"""The generator stage's training step on pre-tokenized images vs on images encoded every step.

The tiny-gen model (random weights: speed does not depend on them), precision ``auto`` and the math attention kernel as
the training loop uses them, the optimizer step included, batch 64. Both variants read their batch from a real
DataLoader worker over the same synthetic shards, as ``tools/train.py`` does, because PNG decoding shares the
2 cores with the step: "images" decodes PNGs and encodes them with the frozen tokenizer inside the step (the
``train.pretokenize=false`` path), "tokens" reads token shards written once by ``mmfusion.train.pretokenize``
(the default; the one-off pass is timed too).

    python benchmarks/bench_generator.py            # ~2 minutes on 2 cores
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mmfusion.config import load_config
from mmfusion.data import ImageTransform, ShardStream, make_loader, resolve_shards
from mmfusion.models import create_model, create_tokenizer
from mmfusion.train.loop import train
from mmfusion.train.optim import create_optimizer
from mmfusion.train.precision import ComputeContext
from mmfusion.train.pretokenize import pretokenize_shards
from mmfusion.train.tasks import LossTask


def _samples_per_s(cfg, model, urls: list[str], image_tokens: bool, steps: int, warmup: int = 3) -> float:
    transform = ImageTransform(64, cfg.model.preprocess, train=True, crop_scale_min=1.0)
    tokenizer = create_tokenizer(32)
    stream = ShardStream(urls, cfg.train.batch_size, transform, tokenizer, train=True, image_tokens=image_tokens)
    batches = iter(make_loader(stream, 1))
    task = LossTask(torch.device("cpu"), ComputeContext(torch.device("cpu"), "auto"))
    optimizer = create_optimizer(model, cfg.train)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        task.step(model, [next(batches)])
        optimizer.step()
    return steps * cfg.train.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = ["data.synthetic_train=2000", "data.synthetic_val=10", f"data.synthetic_dir={tmp}", "data.val="]
        quiet = ["train.tensorboard=false", "train.steps=1"]
        stage1 = load_config("tiny-gen", [*data, *quiet, "model.kind=image_tokenizer"])
        train(stage1, run_dir=Path(tmp) / "tokenizer", progress=False)  # a stage-1 checkpoint to tokenize with
        cfg = load_config("tiny-gen", [*data, *quiet, f"model.tokenizer_checkpoint={Path(tmp) / 'tokenizer'}"])
        urls = resolve_shards("synthetic", cfg.data, 64, "train")
        start = time.perf_counter()
        token_urls, _ = pretokenize_shards(cfg, urls, Path(tmp) / "generator", torch.device("cpu"), progress=False)
        pass_s = time.perf_counter() - start
        model = create_model(cfg.model).train()
        images = _samples_per_s(cfg, model, urls, False, args.steps)
        tokens = _samples_per_s(cfg, model, token_urls, True, args.steps)
    print(f"generator step, images encoded every step: {images:7.1f} samples/s")
    print(f"generator step, pre-tokenized:             {tokens:7.1f} samples/s  ({tokens / images:.2f}x)")
    print(f"one-off pass: {pass_s:.1f} s for 2000 images")
    print(json.dumps({"images_samples_per_s": images, "tokens_samples_per_s": tokens, "pass_s_per_2000": pass_s}))


if __name__ == "__main__":
    main()
