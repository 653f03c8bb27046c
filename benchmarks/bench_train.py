#!/usr/bin/env python
"""Training throughput: mmfusion's trainer vs open_clip's own (``open_clip_train``), side by side.

Both train the same shape (embed 256; ViT 64 px, patch 8, width 256, 6 layers, 4 heads; text context
32, width 256, 4 layers, 4 heads) on the same synthetic shards, with the same batch size, one loader
worker each, each at its best CPU precision (bf16 autocast where the CPU computes bf16 natively, else fp32:
see ``mmfusion.train.precision``). Each runs in its own subprocess so the
peak RSS (``wait4``) is that trainer's alone.

Throughput is measured the same way for both: samples between the second and the last progress log
line divided by the wall time between them (time stamped by this script as the lines arrive, or by
our metrics.jsonl), so start-up, data building and compilation are excluded for both.

open_clip_train 3.3 fails with webdataset 1.x at the first shard boundary (KeyError 'fname',
open_clip #935); the launcher below replaces its ``tarfile_to_samples_nothrow`` with one that passes
``eof_value=None``, nothing else.

    python benchmarks/bench_train.py                 # ~4 minutes on 2 cores
    python benchmarks/bench_train.py --profile       # also: where our step time goes
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPEN_CLIP_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 256, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}

# tiny's image tower is a conv-stem ViT at 16 px tokens, width 128 and depth 3; open_clip has no such tower, so ours
# runs the plain 8 px patchify at OPEN_CLIP_CONFIG's widths and depths here and both train the same shape.
SAME_TOWER = [
    "model.vision.stem=patch", "model.vision.patch_size=8",
    "model.vision.width=256", "model.text.width=256", "model.embed_dim=256",
    "model.vision.depth=6", "model.text.depth=4",
]  # fmt: skip

OPEN_CLIP_LAUNCHER = """
import json, sys
import open_clip, open_clip_train.data as data
from webdataset.tariterators import url_opener, tar_file_expander
open_clip.add_model_config(sys.argv[1])

def tarfile_to_samples_nothrow(src, handler=data.log_and_continue):  # open_clip #935 workaround
    streams = url_opener(src, handler=handler)
    files = tar_file_expander(streams, handler=handler, eof_value=None)
    return data.group_by_keys_nothrow(files, handler=handler)

data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
from open_clip_train.main import main
main(sys.argv[2:])
"""

PROGRESS = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")


def run_measured(cmd: list[str], env: dict, on_line=None) -> tuple[int, float, list[str]]:
    """Run ``cmd``; return (exit code, peak RSS in MB of the process tree's largest member, output lines)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if on_line:
            on_line(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, lines


def steady_rate(points: list[tuple[float, float]]) -> float:
    """Samples/s between the second and the last (time, samples) point."""
    if len(points) < 3:
        raise RuntimeError(f"too few progress points to measure: {points}")
    (t0, s0), (t1, s1) = points[1], points[-1]
    return (s1 - s0) / (t1 - t0)


def bench_open_clip(shards: str, n_samples: int, args, workdir: Path, env: dict) -> dict:
    config = workdir / "mmf-bench.json"
    config.write_text(json.dumps(OPEN_CLIP_CONFIG))
    cmd = [
        sys.executable, "-c", OPEN_CLIP_LAUNCHER, str(config),
        "--model", "mmf-bench", "--train-data", shards, "--train-num-samples", str(n_samples),
        "--dataset-type", "webdataset", "--batch-size", str(args.batch_size), "--epochs", "1",
        "--workers", str(args.workers), "--precision", args.open_clip_precision, "--lr", "1e-3",
        "--wd", "0.1", "--warmup", "50", "--log-every-n-steps", str(args.log_every), "--save-frequency", "0",
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu", "--seed", "0",
        "--logs", str(workdir / "open_clip_logs"), "--name", "bench",
    ]  # fmt: skip
    points: list[tuple[float, float]] = []

    def on_line(line: str) -> None:
        match = PROGRESS.search(line)
        if match:
            points.append((time.monotonic(), float(match.group(1))))

    code, rss, lines = run_measured(cmd, env, on_line)
    if code != 0:
        raise RuntimeError("open_clip_train failed:\n" + "\n".join(lines[-30:]))
    return {"samples_per_s": steady_rate(points), "peak_rss_mb": rss}


def bench_mmfusion(shards: str, n_samples: int, args, workdir: Path, env: dict) -> dict:
    run_dir = workdir / "mmfusion_run"
    steps = n_samples // args.batch_size
    cmd = [
        sys.executable, str(Path(__file__).resolve().parent.parent / "tools" / "train.py"),
        "--config", "tiny", "--run-dir", str(run_dir), "--no-progress", *SAME_TOWER,
        f"data.train={shards}", "data.val=", f"data.train_samples={n_samples}", f"data.workers={args.workers}",
        f"train.batch_size={args.batch_size}", f"train.steps={steps}", f"train.log_every={args.log_every}",
        "train.checkpoint_every=1000000", "train.tensorboard=false", f"train.precision={args.precision}",
        f"train.compile={str(args.compile).lower()}",
    ]  # fmt: skip
    code, rss, lines = run_measured(cmd, env)
    if code != 0:
        raise RuntimeError("mmfusion train failed:\n" + "\n".join(lines[-30:]))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = [(r["time"], r["step"] * args.batch_size) for r in records if "loss" in r]
    return {"samples_per_s": steady_rate(points), "peak_rss_mb": rss}


def profile_mmfusion(shards: str, args) -> None:
    """Where one training step's time goes (ours): the top operators by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mmfusion.config import load_config
    from mmfusion.data import ImageTransform, ShardStream, expand_shards, make_loader
    from mmfusion.models import create_model, create_tokenizer
    from mmfusion.train.losses import create_contrastive_loss
    from mmfusion.train.optim import create_optimizer
    from mmfusion.train.precision import ComputeContext
    from mmfusion.train.tasks import ContrastiveTask

    cfg = load_config("tiny", SAME_TOWER)
    model = create_model(cfg.model)
    optimizer = create_optimizer(model, cfg.train)
    tokenizer = create_tokenizer(32)
    transform = ImageTransform(64, cfg.model.preprocess, train=True)
    stream = ShardStream(expand_shards(shards), args.batch_size, transform, tokenizer, train=True)
    batches = iter(make_loader(stream, 0))
    autocast = ComputeContext(torch.device("cpu"), args.precision)
    task = ContrastiveTask(create_contrastive_loss("clip"), torch.device("cpu"), autocast)

    def step():
        batch = next(batches)
        task.step(model, [batch])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6400, help="training samples per trainer")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--precision", default="auto", help="ours: auto, bf16 or fp32")
    parser.add_argument(
        "--open-clip-precision", default="auto", help="theirs: amp_bf16, amp, fp32, or auto (as ours would choose)"
    )
    parser.add_argument("--compile", action="store_true", help="ours with torch.compile")
    parser.add_argument("--only", choices=["mmfusion", "open_clip"], help="run one trainer only")
    parser.add_argument("--profile", action="store_true", help="print where our step time goes")
    args = parser.parse_args(argv)
    if args.only != "mmfusion" and importlib.util.find_spec("pandas") is None:  # found out only after building shards
        parser.error('open_clip_train imports pandas: pip install -e ".[bench]" (or run make bench)')
    import torch

    from mmfusion.train.precision import resolve_precision

    if args.open_clip_precision == "auto":  # the same arithmetic for both trainers
        ours = resolve_precision(torch.device("cpu"), args.precision)
        args.open_clip_precision = "amp_bf16" if ours == "bf16" else "fp32"

    from mmfusion.data.synthetic import write_synthetic_shards

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        shards = write_synthetic_shards(workdir / "shards", "train", args.samples, seed=0, samples_per_shard=800)
        print(f"shards: {shards} ({args.samples} samples)", flush=True)
        results = {}
        if args.only != "mmfusion":
            results["open_clip"] = bench_open_clip(shards, args.samples, args, workdir, env)
            print(f"open_clip_train: {results['open_clip']}", flush=True)
        if args.only != "open_clip":
            results["mmfusion"] = bench_mmfusion(shards, args.samples, args, workdir, env)
            print(f"mmfusion:        {results['mmfusion']}", flush=True)
        if len(results) == 2:
            ours, theirs = results["mmfusion"], results["open_clip"]
            results["speedup"] = ours["samples_per_s"] / theirs["samples_per_s"]
            results["rss_ratio"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
            print(f"ours/open_clip: {results['speedup']:.2f}x samples/s, {results['rss_ratio']:.2f}x peak RSS")
        if args.profile:
            profile_mmfusion(shards, args)
    results["config"] = {k: v for k, v in vars(args).items() if k != "profile"}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
