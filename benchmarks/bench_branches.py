#!/usr/bin/env python
"""What the optional parts cost per training step, side by side with their references.

Same batch of random 64 px images and real synthetic captions, the training loop's precision (``auto``: bf16
autocast where the CPU computes bf16 natively, else fp32), the optimizer step included,
data loading excluded (it is measured separately for audio):

- ``tiny`` contrastive (the reference for both branches) and ``tiny`` + fusion head, with the shipped conv-stem
  image tower, also with hard matching negatives for the whole batch (``allneg``, the default before
  ``fusion.match_negatives=0.5``), and without the stem's 8x8 map folded into the tokens the decoder
  reads (``nostem``, ``fusion.stem_memory=false``); the same two with the plain 8 px patchify at width 256
  (``patch8``, no stem memory), the towers open_clip's CoCa has and ``tiny-audio`` keeps, and ``patch8`` + audio tower;
- open_clip's CoCa with the same towers as ``patch8`` and a 2-layer multimodal decoder, trained with open_clip's
  ``CoCaLoss`` (full-vocabulary softmax), the reference for our fusion head (adaptive softmax). Its other
  defaults are kept (attentional pooler with 256 queries as decoder memory, where we use the 65 image tokens);
- the audio front end per clip (FLAC decode, 8 -> 16 kHz resampling, log-mel), single-threaded as in a
  loader worker, next to the image decode + transform it runs beside.

    python benchmarks/bench_branches.py            # ~3 minutes on 2 cores
    python benchmarks/bench_branches.py --only tiny tiny+fusion --precision fp32   # then bf16: what auto weighs
    python benchmarks/bench_branches.py --only tiny+fusion tiny+fusion-allneg tiny+fusion tiny+fusion-allneg --steps 8
    python benchmarks/bench_branches.py --only tiny+fusion tiny+fusion-nostem tiny+fusion tiny+fusion-nostem --steps 8
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import torch


def _time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


# The shape of the CoCa reference below and of tiny-audio: plain 8 px patchify, width 256, depth 6/4 (tiny: 128, 3/3).
PATCH8 = [
    "model.vision.stem=patch", "model.vision.patch_size=8",
    "model.vision.width=256", "model.text.width=256", "model.embed_dim=256",
    "model.vision.depth=6", "model.text.depth=4",
]  # fmt: skip


def _ours(tower: list[str], overrides: dict, batch: dict, autocast):
    from mmfusion import create_model
    from mmfusion.config import load_config
    from mmfusion.train.losses import create_contrastive_loss
    from mmfusion.train.optim import create_optimizer
    from mmfusion.train.tasks import ContrastiveTask, FusionWeights

    cfg = load_config("tiny", tower)
    model = create_model(cfg.model, **overrides).train()
    fusion = FusionWeights() if model.fusion is not None else None
    audio = 1.0 if model.audio is not None else None
    task = ContrastiveTask(create_contrastive_loss("clip"), torch.device("cpu"), autocast, fusion, audio)
    optimizer = create_optimizer(model, cfg.train)

    def step():
        task.step(model, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _open_clip_coca(batch: dict, autocast):
    from open_clip import CoCa
    from open_clip.loss import CoCaLoss

    model = CoCa(
        embed_dim=256,
        multimodal_cfg={"context_length": 32, "width": 256, "heads": 4, "layers": 2, "vocab_size": 49408},
        text_cfg={
            "context_length": 32,
            "vocab_size": 49408,
            "width": 256,
            "heads": 4,
            "layers": 4,
            "embed_cls": True,
            "output_tokens": True,
        },  # fmt: skip
        vision_cfg={
            "image_size": 64,
            "layers": 6,
            "width": 256,
            "patch_size": 8,
            "head_width": 64,
            "attentional_pool": True,
            "attn_pooler_heads": 4,
            "output_tokens": True,  # as in its CoCa configs
        },  # fmt: skip
    ).train()
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        with autocast:
            out = model(batch["image"], batch["text"])
        clip_loss, caption_loss = loss_fn(
            out["image_features"].float(),
            out["text_features"].float(),
            out["logits"].float(),
            out["labels"],
            out["logit_scale"].float(),
        )
        (clip_loss + caption_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _front_end_ms(repeats: int) -> dict[str, float]:
    from mmfusion.config import AudioTowerConfig, PreprocessConfig
    from mmfusion.data import ImageTransform, load_image
    from mmfusion.data.audio import audio_transform_for
    from mmfusion.data.synthetic import make_sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    samples = [make_sample(i, "train", seed=0, audio=True) for i in range(repeats)]
    audio = audio_transform_for(AudioTowerConfig(enabled=True))
    image = ImageTransform(64, PreprocessConfig())
    ms = {
        "audio_front_end_ms": 1000 * _time_steps(lambda: [audio(s["flac"]) for s in samples], 1, 3) / repeats,
        "image_decode_transform_ms": 1000
        * _time_steps(lambda: [image(load_image(io.BytesIO(s["png"]))) for s in samples], 1, 3)
        / repeats,
    }
    torch.set_num_threads(threads)
    return ms


BRANCHES = (
    "tiny", "tiny+fusion", "tiny+fusion-allneg", "tiny+fusion-nostem", "patch8", "patch8+fusion", "open_clip CoCa",
    "patch8+audio",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="autocast for every model (default: auto)"
    )
    parser.add_argument("--only", nargs="+", choices=BRANCHES, help="time these alone (no ratios, no front end)")
    args = parser.parse_args()

    from mmfusion.data.synthetic import make_sample
    from mmfusion.models import create_tokenizer
    from mmfusion.train.precision import ComputeContext

    torch.manual_seed(0)
    b = args.batch_size
    captions = [make_sample(i, "train", seed=0)["txt"].decode() for i in range(b)]
    batch = {"image": torch.randn(b, 3, 64, 64), "text": create_tokenizer(32)(captions)}
    audio_batch = {**batch, "audio": torch.randn(b, 64, 101), "has_audio": torch.ones(b, dtype=torch.bool)}
    autocast = ComputeContext(torch.device("cpu"), args.precision)
    print(f"precision: {autocast.precision}")
    fusion = {"fusion": {"enabled": True}}
    runs = {  # built one at a time, when timed
        "tiny": lambda: _ours([], {}, batch, autocast),
        "tiny+fusion": lambda: _ours([], fusion, batch, autocast),
        "tiny+fusion-allneg": lambda: _ours([], {"fusion": {"enabled": True, "match_negatives": 1.0}}, batch, autocast),
        "tiny+fusion-nostem": lambda: _ours([], {"fusion": {"enabled": True, "stem_memory": False}}, batch, autocast),
        "patch8": lambda: _ours(PATCH8, {}, batch, autocast),
        "patch8+fusion": lambda: _ours(PATCH8, {"fusion": {"enabled": True, "stem_memory": False}}, batch, autocast),
        "open_clip CoCa": lambda: _open_clip_coca(batch, autocast),
        "patch8+audio": lambda: _ours(PATCH8, {"audio": {"enabled": True}}, audio_batch, autocast),
    }
    result = {}
    for name in args.only or BRANCHES:
        seconds = _time_steps(runs[name](), warmup=2, steps=args.steps)
        result[name] = round(b / seconds, 1)
        print(f"{name:16s} {b / seconds:7.1f} samples/s  ({seconds:.2f} s/step)", flush=True)
    if args.only:
        print(json.dumps({"batch_size": b, "precision": autocast.precision, "samples_per_s": result}))
        return
    print(f"fusion head: {result['tiny+fusion'] / result['tiny']:.2f}x the contrastive step's throughput, "
          f"{result['tiny+fusion'] / result['tiny+fusion-allneg']:.2f}x the one mining negatives for the whole batch, "
          f"{result['tiny+fusion'] / result['tiny+fusion-nostem']:.2f}x the one without stem memory "
          f"({result['patch8+fusion'] / result['patch8']:.2f}x with patch8); "
          f"ours vs open_clip CoCa: {result['patch8+fusion'] / result['open_clip CoCa']:.2f}x")  # fmt: skip
    print(f"audio tower: {result['patch8+audio'] / result['patch8']:.2f}x the contrastive step's throughput")
    result.update({k: round(v, 2) for k, v in _front_end_ms(32).items()})
    print(f"per sample in a loader worker: audio front end {result['audio_front_end_ms']:.2f} ms, "
          f"image decode + transform {result['image_decode_transform_ms']:.2f} ms")  # fmt: skip
    print(json.dumps({"batch_size": b, "precision": autocast.precision, "samples_per_s": result}))


if __name__ == "__main__":
    main()
