"""The training loop: one function that reads top to bottom, like nanoGPT's ``train.py``.

``train(cfg)`` runs unchanged on one CPU or under ``torchrun`` (DDP, gloo on CPU, nccl on GPU):
setup, data, model, resume, then per step: learning rate, micro-batches, clip, optimizer step,
log, evaluate, checkpoint. Rank 0 logs and saves; every rank hands it its data position first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mmfusion.config import RunConfig, from_dict, to_dict
from mmfusion.data import (
    ImageTransform,
    ShardStream,
    StreamPosition,
    caption_token_counts,
    count_samples,
    make_loader,
    resolve_shards,
)
from mmfusion.data.audio import audio_transform_for
from mmfusion.eval import EVALUATORS
from mmfusion.models import create_model, create_tokenizer
from mmfusion.train import checkpoint as ckpt_io
from mmfusion.train.dist import (
    Dist,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_dist,
    shutdown,
    unwrap,
)
from mmfusion.train.losses import create_contrastive_loss
from mmfusion.train.optim import create_optimizer, lr_at
from mmfusion.train.precision import ComputeContext, bf16_is_native
from mmfusion.train.pretokenize import pretokenize_shards
from mmfusion.train.tasks import ContrastiveTask, FusionWeights, LossTask

log = logging.getLogger("mmfusion.train")
DATA_WAIT_WARNING = 0.3  # warn when more than this share of step time is spent waiting for data


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.model.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def config_from_run(run_dir: str | Path) -> RunConfig:
    """The resolved config a run (or checkpoint) was trained with; for a multi-stage run, the whole recipe."""
    run_dir = Path(run_dir)
    if (run_dir / ckpt_io.STAGES).is_file():
        return from_dict(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    state = ckpt_io.read_state(ckpt_io.find_checkpoint(run_dir))
    return from_dict(RunConfig, state["config"])


def eval_stream(cfg: RunConfig, urls: list[str], tokenizer) -> ShardStream:
    transform = ImageTransform(cfg.model.vision.image_size, cfg.model.preprocess)
    audio = audio_transform_for(cfg.model.audio) if cfg.model.audio.enabled else None
    return ShardStream(urls, 2 * cfg.train.batch_size, transform, tokenizer, train=False, audio_transform=audio)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _open_tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train a model; returns ``{"run_dir", "checkpoint", "step", "metrics", "skipped_samples", "model"}``."""
    # ---- setup -------------------------------------------------------------------------------
    tc = cfg.train
    if tc.loss == "siglip" and not cfg.model.logit_bias:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, logit_bias=True))
    dist: Dist = init_dist(tc.device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if not resume and (run_dir / "checkpoints").exists():
        raise ckpt_io.CheckpointError(f"{run_dir} already holds a run; continue it with --resume {run_dir}")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    autocast = ComputeContext(dist.device, tc.precision)
    if tc.precision == "bf16" and not bf16_is_native(dist.device):
        log.warning("train.precision=bf16: %s emulates bf16, which is many times slower than fp32 here", dist.device)

    # ---- data --------------------------------------------------------------------------------
    image_size = cfg.model.vision.image_size
    pretokenized = cfg.model.kind == "text_to_image" and tc.pretokenize
    data_plan, pretokenize_skipped = None, 0
    if dist.is_main:  # rank 0 resolves (and builds the synthetic set) once; every rank then uses its answer
        train_urls = resolve_shards(cfg.data.train, cfg.data, image_size, "train")
        val_urls = resolve_shards(cfg.data.val, cfg.data, image_size, "val") if cfg.data.val else []
        if pretokenized:  # the generator stage: encode every training image once (mmfusion.train.pretokenize)
            train_urls, manifest = pretokenize_shards(cfg, train_urls, run_dir, dist.device, autocast, progress)
            pretokenize_skipped = manifest["skipped_samples"]
        data_plan = (train_urls, val_urls, cfg.data.train_samples or count_samples(train_urls))
    train_urls, val_urls, train_samples = broadcast_object(dist, data_plan)
    readers = dist.world_size * max(1, cfg.data.workers)
    if dist.is_main and len(train_urls) >= readers and len(train_urls) % readers:
        log.warning("%d shards over %d readers: some read more shards than others", len(train_urls), readers)
    global_batch = tc.batch_size * tc.accum_steps * dist.world_size
    total_steps = tc.steps or max(1, math.ceil(tc.epochs * train_samples / global_batch))
    tokenizer = create_tokenizer(cfg.model.text.context_length)

    # ---- model, optimizer, resume ------------------------------------------------------------
    model = create_model(cfg.model)
    if cfg.model.kind == "text_to_image" and not resume:
        ckpt_io.load_submodule(cfg.model.tokenizer_checkpoint, model, "tokenizer")  # stage 1's weights, frozen
    if cfg.model.kind == "clip" and cfg.model.fusion.enabled and cfg.model.fusion.vocab_order == "data" and not resume:
        # The caption decoder's frequent words go to its softmax head (FusionHead.set_vocab_order); a resumed run
        # reads the order back with its weights.
        counts = caption_token_counts(train_urls, tokenizer, cfg.model.text.vocab_size) if dist.is_main else None
        model.fusion.set_vocab_order(broadcast_object(dist, counts))
    model = model.to(dist.device)
    if tc.grad_checkpointing:
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        else:
            log.warning("train.grad_checkpointing is ignored: %s models do not support it", cfg.model.kind)
    optimizer = create_optimizer(model, tc)
    # Bad samples the pre-tokenizing pass dropped count once, with rank 0's, in a run's total.
    step, data_start, skipped_total, last_metrics = 0, None, pretokenize_skipped, {}
    if resume:
        ckpt = ckpt_io.find_checkpoint(run_dir)
        state = ckpt_io.read_state(ckpt)
        ckpt_io.load_weights(ckpt, model)
        ckpt_io.load_optimizer(ckpt, optimizer)
        step, last_metrics = state["step"], state.get("metrics", {})
        skipped = state.get("skipped_samples", [0])  # per rank
        skipped_total = skipped[dist.rank] if len(skipped) == dist.world_size else sum(skipped) * dist.is_main
        if state["world_size"] == dist.world_size and state["workers"] == cfg.data.workers:
            data_start = state["data"][dist.rank]
            ckpt_io.set_rng_state(state["rng"][dist.rank])
        else:  # positions are per (rank, worker); with another layout, restart the current epoch
            epoch = min(e for rank in state["data"] for e, _ in rank["workers"].values())
            data_start = {"workers": {str(w): [epoch, 0] for w in range(max(1, cfg.data.workers))}}
            log.warning("resuming with a different world size or worker count: data restarts at epoch %d", epoch)
    train_model = (
        DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        if dist.enabled
        else model
    )
    if tc.compile:
        train_model = torch.compile(train_model)
    if cfg.model.kind == "clip":
        fusion_weights = (
            FusionWeights(tc.contrastive_weight, tc.caption_weight, tc.match_weight)
            if cfg.model.fusion.enabled
            else None
        )
        task = ContrastiveTask(
            create_contrastive_loss(tc.loss, dist.rank, dist.world_size),
            dist.device,
            autocast,
            fusion_weights,
            audio_weight=tc.audio_weight if cfg.model.audio.enabled else None,
        )
    else:  # the generation stages compute their own loss
        task = LossTask(dist.device, autocast)

    transform = ImageTransform(
        image_size, cfg.model.preprocess, train=True, crop_scale_min=cfg.data.crop_scale_min, hflip=cfg.data.hflip
    )
    stream = ShardStream(
        train_urls, tc.batch_size, transform, tokenizer, train=True, seed=tc.seed, rank=dist.rank,
        world_size=dist.world_size, shuffle_buffer=cfg.data.shuffle_buffer, start=data_start,
        audio_transform=audio_transform_for(cfg.model.audio, train=True) if cfg.model.audio.enabled else None,
        image_tokens=pretokenized,
    )  # fmt: skip
    position = StreamPosition(cfg.data.workers, data_start)
    batches = iter(make_loader(stream, cfg.data.workers))

    metrics_path = run_dir / "metrics.jsonl"
    writer = _open_tensorboard(run_dir, tc.tensorboard) if dist.is_main else None
    bar = tqdm(
        total=total_steps, initial=step, disable=not (progress and dist.is_main), unit="step", dynamic_ncols=True
    )
    if dist.is_main:
        bar.write(
            f"training {cfg.model.name} for {total_steps} steps ({total_steps * global_batch} samples, "
            f"{train_samples} per epoch, global batch {global_batch}) on {dist.device} x{dist.world_size}, "
            f"{autocast.precision} -> {run_dir}"
        )

    def save(step: int) -> Path | None:
        state = {
            "config": to_dict(cfg),
            "data": all_gather_object(dist, position.state()),
            "rng": all_gather_object(dist, ckpt_io.rng_state()),
            "world_size": dist.world_size,
            "workers": cfg.data.workers,
            "samples_seen": step * global_batch,
            "skipped_samples": all_gather_object(dist, skipped_total),  # per rank: a resume must not recount
            "metrics": last_metrics,
        }
        path = (
            ckpt_io.save_checkpoint(run_dir, step, unwrap(model), optimizer, state, tc.keep_last)
            if dist.is_main
            else None
        )
        barrier(dist)
        return path

    def run_eval(step: int) -> dict:
        metrics = {}
        if dist.is_main and val_urls:
            try:
                loader = make_loader(eval_stream(cfg, val_urls, tokenizer), 0)
                metrics = EVALUATORS[cfg.model.kind](unwrap(model), tokenizer, loader, dist.device, autocast)
            except ValueError as exn:  # e.g. every held-out sample unreadable: report it, keep the run
                log.warning("evaluation at step %d failed: %s", step, exn)
            _append_jsonl(metrics_path, {"step": step, "eval": metrics})
            if writer:
                for k, v in metrics.items():
                    writer.add_scalar(f"eval/{k}", v, step)
        barrier(dist)
        model.train()
        return metrics

    # ---- the loop ----------------------------------------------------------------------------
    model.train()
    window_start, window_data, window_steps, warned = time.perf_counter(), 0.0, 0, False
    last_save_time, ckpt_path = time.monotonic(), None
    while step < total_steps:
        lr = lr_at(step, total_steps, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr

        t0 = time.perf_counter()
        micro_batches = [next(batches) for _ in range(tc.accum_steps)]
        window_data += time.perf_counter() - t0
        for b in micro_batches:
            position.update(b)
            skipped_total += b["skipped"]

        loss, task_metrics = task.step(train_model, micro_batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "logit_scale"):
            with torch.no_grad():  # CLIP caps the temperature at 100 to keep the logits stable
                model.logit_scale.clamp_(0, math.log(100))
        step += 1
        window_steps += 1
        bar.update(1)

        if step % tc.log_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step,
                "time": time.time(),
                "loss": loss,
                "lr": lr,
                "samples_per_s": window_steps * global_batch / elapsed,
                "data_wait": window_data / elapsed,
                "skipped_samples": skipped_total,
                **task_metrics,
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            bar.set_postfix(loss=f"{loss:.3f}", sps=f"{record['samples_per_s']:.0f}", data=f"{record['data_wait']:.0%}")
            if dist.is_main:
                _append_jsonl(metrics_path, record)
                if writer:
                    for k, v in record.items():
                        writer.add_scalar(f"train/{k}", v, step)
            if record["data_wait"] > DATA_WAIT_WARNING and step > tc.log_every and not warned:
                warned = True
                log.warning(
                    "%.0f%% of step time is spent waiting for data; raise data.workers", 100 * record["data_wait"]
                )
            window_start, window_data, window_steps = time.perf_counter(), 0.0, 0

        if tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
            last_metrics = run_eval(step)
        # The time-based cadence follows rank 0's clock, checked at log steps, so ranks never disagree.
        due = step % tc.checkpoint_every == 0
        if step % tc.log_every == 0:
            due = due or broadcast_object(dist, time.monotonic() - last_save_time > 60 * tc.checkpoint_every_minutes)
        if step < total_steps and due:  # every rank must join a save
            ckpt_path = save(step)
            last_save_time = time.monotonic()

    # ---- wrap up -------------------------------------------------------------------------------
    bar.close()
    ckpt_path = save(step)  # the weights first, so a failing evaluation cannot lose the last steps
    final_metrics = run_eval(step)
    if final_metrics:
        last_metrics = final_metrics
    if dist.is_main:  # "finished": a multi-stage recipe does not retrain this stage on --resume
        ckpt_io.update_state(ckpt_path, metrics=last_metrics, finished=True)
    skipped_total = int(all_reduce_sum(dist, skipped_total))
    if writer:
        writer.close()
    if dist.is_main:
        if skipped_total:
            log.warning("skipped %d unreadable samples", skipped_total)
        if last_metrics:
            print(format_metrics(last_metrics))
        print(f"checkpoint: {ckpt_path}")
    shutdown(dist)
    return {
        "run_dir": run_dir,
        "checkpoint": ckpt_path,
        "step": step,
        "metrics": last_metrics,
        "skipped_samples": skipped_total,
        "model": model,
    }


def format_metrics(metrics: dict) -> str:
    """A short human summary of held-out metrics."""
    parts = [f"held-out ({int(metrics.get('eval_samples', 0))} samples):"]
    others = [k for k in metrics if "_to_" not in k and "zero_shot" not in k and "samples" not in k]
    if others and not any(k.startswith("text_to_image") for k in metrics):  # not a contrastive model: list them
        return "\n".join(parts + [f"  {k}: {metrics[k]:.2f}" for k in sorted(others)])
    for prefix, label in (("", "all"), ("unseen/", "unseen combinations")):
        keys = [f"{prefix}text_to_image_R@1", f"{prefix}text_to_image_R@5", f"{prefix}image_to_text_R@1"]
        if all(k in metrics for k in keys):
            parts.append(
                f"  {label}: text->image R@1 {metrics[keys[0]]:.1f} R@5 {metrics[keys[1]]:.1f}, "
                f"image->text R@1 {metrics[keys[2]]:.1f}"
                + (
                    f", zero-shot top-1 {metrics[prefix + 'zero_shot_top1']:.1f}"
                    if prefix + "zero_shot_top1" in metrics
                    else ""
                )
            )
    return "\n".join(parts)
