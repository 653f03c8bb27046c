"""Multi-stage recipes: a ``text_to_image`` config trains the image tokenizer, then the generator.

One command, two sub-runs under the run directory: ``tokenizer/`` (stage 1, ``model.kind=image_tokenizer``)
and ``generator/`` (stage 2, starting from stage 1's tokenizer, frozen; it first encodes the training images into
token shards once, :mod:`mmfusion.train.pretokenize`). ``--resume`` continues whichever
stage is unfinished; a finished stage (its checkpoint reached its planned step count) is not retrained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from mmfusion.config import RunConfig, to_dict
from mmfusion.train import checkpoint as ckpt_io
from mmfusion.train.loop import train

STAGE_DIRS = ("tokenizer", "generator")


def _stage_configs(cfg: RunConfig, run_dir: Path) -> list[RunConfig]:
    """Stage 1 trains the tokenizer for ``train.tokenizer_steps``; stage 2 uses the rest of the settings."""
    tokenizer_cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, kind="image_tokenizer"),
        train=dataclasses.replace(cfg.train, steps=cfg.train.tokenizer_steps, lr=cfg.train.tokenizer_lr),
    )
    generator_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, tokenizer_checkpoint=str(run_dir / STAGE_DIRS[0]))
    )
    return [tokenizer_cfg, generator_cfg]


def _finished(stage_dir: Path) -> bool:
    try:
        ckpt = ckpt_io.find_checkpoint(stage_dir)
    except ckpt_io.CheckpointError:
        return False
    return bool(json.loads((ckpt / "state.json").read_text()).get("finished", False))


def train_stages(cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """Train every stage of ``cfg`` (one for most models, two for ``text_to_image``) under ``run_dir``."""
    if cfg.model.kind != "text_to_image":
        return [train(cfg, run_dir=run_dir, resume=resume, progress=progress)]
    run_dir = Path(run_dir)
    if not resume:
        if (run_dir / ckpt_io.STAGES).exists():
            raise ckpt_io.CheckpointError(f"{run_dir} already holds a run; continue it with --resume {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        ckpt_io.atomic_write_text(run_dir / ckpt_io.STAGES, json.dumps({"stages": list(STAGE_DIRS)}))
    results = []
    for name, stage_cfg in zip(STAGE_DIRS, _stage_configs(cfg, run_dir), strict=True):
        stage_dir = run_dir / name
        if resume and _finished(stage_dir):
            continue
        started = (stage_dir / "checkpoints").exists()
        results.append(train(stage_cfg, run_dir=stage_dir, resume=resume and started, progress=progress))
    return results
