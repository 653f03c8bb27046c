#!/usr/bin/env python
"""The text tower on real tokens only (ours: cut at the longest caption, padding rows skipped, ``models/packed.py``)
vs open_clip's ``TextTransformer.forward`` (every block over the full context).

Same weights (the ``tiny`` text tower), same real synthetic captions, the training loop's precision (``auto``):

- training: forward + backward over a batch of 128 captions (padded to 32 tokens by the tokenizer);
- decoding: forward over a batch of caption prefixes of 2..16 tokens, as a caption decoder feeds them step by
  step (open_clip's pass needs them padded to the full context, ours takes them as they are).

    python benchmarks/bench_text.py            # ~1 minute on 2 cores
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _seconds(fn, warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from mmfusion.config import load_config
    from mmfusion.data.synthetic import make_sample
    from mmfusion.models import create_tokenizer
    from mmfusion.models.text import TextTower
    from mmfusion.train.precision import ComputeContext

    torch.manual_seed(0)
    cfg = load_config("tiny").model
    tower = TextTower(cfg.text, cfg.embed_dim)
    tokenizer = create_tokenizer(cfg.text.context_length)
    captions = [make_sample(i, "train", seed=0)["txt"].decode() for i in range(args.batch_size)]
    tokens = tokenizer(captions)  # (B, 32)
    ctx = ComputeContext(torch.device("cpu"), "auto")

    def train_step(forward):
        def run():
            tower.zero_grad(set_to_none=True)
            with ctx:
                pooled, states = forward(tokens)
            (pooled.float().sum() + states.float().mean()).backward()

        return run

    prefixes = [tokens[:, :n] for n in range(2, 17)]  # a decoder's prefixes: no padding inside

    def decode_ours():
        with torch.no_grad(), ctx:
            for p in prefixes:
                tower(p)

    def decode_open_clip():
        with torch.no_grad(), ctx:
            for p in prefixes:
                tower.transformer(F.pad(p, (0, tokens.shape[1] - p.shape[1])))

    pairs = {  # name: (ours, open_clip's)
        "train_step_s": (train_step(tower), train_step(tower.transformer)),
        "decode_15_prefixes_s": (decode_ours, decode_open_clip),
    }
    lengths = (tokens != 0).sum(dim=1).float()
    print(f"captions: mean {lengths.mean():.1f} tokens, longest {int(lengths.max())} of {tokens.shape[1]}")
    print(f"precision: {ctx.precision}, threads: {torch.get_num_threads()}")
    print(f"{'':24s}{'ours':>10s}{'open_clip':>12s}{'speed-up':>10s}")
    result = {"precision": ctx.precision}
    for name, (ours_fn, theirs_fn) in pairs.items():
        ours, theirs = _seconds(ours_fn, repeats=args.repeats), _seconds(theirs_fn, repeats=args.repeats)
        print(f"{name:24s}{ours:10.4f}{theirs:12.4f}{theirs / ours:9.2f}x")
        result[name] = {"ours": ours, "open_clip": theirs, "speedup": theirs / ours}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
