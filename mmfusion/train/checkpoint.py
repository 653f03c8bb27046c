"""Checkpoints: safetensors weights + JSON state, written atomically, loaded without unpickling.

Layout of a run directory::

    runs/NAME/config.yaml              the resolved run config
    runs/NAME/metrics.jsonl            one JSON object per log/eval line
    runs/NAME/checkpoints/step_000500/ model.safetensors  state.json  optimizer.pt
    runs/NAME/checkpoints/latest.json  {"checkpoint": "step_000500"}

A checkpoint directory is written under a temporary name and renamed into place; ``latest.json``
is replaced by ``os.replace``. A crash at any moment leaves the previous checkpoint loadable.
``state.json`` carries the resolved config (preprocessing included), the step, every rank's data
position and RNG state, so a checkpoint alone rebuilds model + preprocessing offline. The optimizer
state is a ``torch.save`` file read back with ``weights_only=True``: tensors and plain containers,
never arbitrary pickled objects.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmfusion.data.writer import atomic_write_bytes

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"
LATEST = "latest.json"


class CheckpointError(ValueError):
    """A path that is not a loadable mmfusion checkpoint or run directory."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoints/step_XXXXXX`` atomically, point ``latest.json`` at it, prune old ones."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = ckpt_root / name
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}."))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        full_state = {"format": FORMAT_VERSION, "step": step, **state}
        (tmp / STATE).write_text(json.dumps(full_state, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is for sharing
        if final.exists():  # re-saving a step (resuming a finished run): move the old one aside, not delete it
            os.replace(final, ckpt_root / f".{name}.old")
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckpt_root / LATEST, json.dumps({"checkpoint": name}))
    shutil.rmtree(ckpt_root / f".{name}.old", ignore_errors=True)
    _prune(ckpt_root, keep_last, keep=name)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    steps = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def update_state(ckpt: Path, **fields: Any) -> None:
    """Atomically merge ``fields`` into a checkpoint's ``state.json`` (e.g. metrics computed after saving)."""
    state = read_state(ckpt)
    state.update(fields)
    atomic_write_text(ckpt / STATE, json.dumps(state, indent=1))


STAGES = "stages.json"  # in a multi-stage run directory: {"stages": [sub-run names, in training order]}


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory (its latest checkpoint), a checkpoint directory, or a multi-stage run
    directory (the latest checkpoint of its last stage, which holds the whole model)."""
    path = Path(path)
    if (path / WEIGHTS).is_file() and (path / STATE).is_file():
        return path
    if (path / STAGES).is_file():
        try:
            last = json.loads((path / STAGES).read_text())["stages"][-1]
        except (ValueError, KeyError, IndexError) as exn:
            raise CheckpointError(f"{path / STAGES}: unreadable ({exn})") from None
        return find_checkpoint(path / last)
    latest = path / "checkpoints" / LATEST
    if latest.is_file():
        try:
            name = json.loads(latest.read_text())["checkpoint"]
        except (ValueError, KeyError) as exn:
            raise CheckpointError(f"{latest}: unreadable ({exn})") from None
        return find_checkpoint(path / "checkpoints" / name)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} is neither a run directory with checkpoints nor a checkpoint directory")


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError) as exn:
        raise CheckpointError(f"{ckpt / STATE}: unreadable ({exn})") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt / STATE}: unsupported checkpoint format {state.get('format')!r}")
    return state


def load_weights(ckpt: Path, model: nn.Module) -> None:
    try:
        tensors = load_file(str(ckpt / WEIGHTS))
    except Exception as exn:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{ckpt / WEIGHTS}: cannot read weights ({exn})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exn:  # the config changed since the weights were saved
        # torch's first line only names the model class; the next one names a missing, unexpected or resized weight.
        lines = [line.strip() for line in str(exn).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{ckpt / WEIGHTS}: does not fit the model config ({detail})") from None


def load_submodule(path: str | Path, model: nn.Module, prefix: str) -> None:
    """Load the ``prefix.*`` weights of the checkpoint at ``path`` (a run or checkpoint directory) into
    ``model.<prefix>``, e.g. stage 1's image tokenizer into the stage-2 model."""
    if not str(path):
        raise CheckpointError(f"model.{prefix}_checkpoint is not set: train stage 1 first (tools/train.py does)")
    ckpt = find_checkpoint(path)
    try:
        tensors = load_file(str(ckpt / WEIGHTS))
    except Exception as exn:
        raise CheckpointError(f"{ckpt / WEIGHTS}: cannot read weights ({exn})") from None
    part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        getattr(model, prefix).load_state_dict(part, strict=True)
    except RuntimeError as exn:
        first = str(exn).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt / WEIGHTS}: its {prefix} does not fit the model config ({first})") from None


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    try:
        optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True))
    except Exception as exn:  # missing, truncated, refused by weights_only, or shaped for another model
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise CheckpointError(f"{ckpt / OPTIMIZER}: cannot restore the optimizer ({first})") from None


def fingerprint(ckpt: Path) -> str:
    """A short hash of the weights and config: identifies which model made an embedding index."""
    digest = hashlib.sha256()
    with open(ckpt / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps(read_state(ckpt).get("config", {}).get("model", {}), sort_keys=True).encode())
    return digest.hexdigest()[:16]
