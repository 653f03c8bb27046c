"""Checkpoint files: atomic writes, pruning by step number, re-saving a step, loading errors."""

import json

import pytest
import torch
from torch import nn

from mmfusion.cli import error_line
from mmfusion.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_optimizer,
    load_weights,
    read_state,
    save_checkpoint,
    update_state,
)


def _model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_prune_keeps_the_newest_by_step_number(tmp_path):
    model = _model()
    for step in (999_500, 1_000_000, 1_000_500):  # string order would keep the wrong ones
        save_checkpoint(tmp_path, step, model, None, {"config": {}}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_1000000", "step_1000500"]
    assert find_checkpoint(tmp_path).name == "step_1000500"


def test_resaving_a_step_replaces_it_and_update_state_merges(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, 5, model, None, {"config": {}, "metrics": {}})
    with torch.no_grad():
        model.weight.add_(1)
    path = save_checkpoint(tmp_path, 5, model, None, {"config": {}, "metrics": {}})
    update_state(path, metrics={"R@1": 50.0})
    assert read_state(path)["metrics"] == {"R@1": 50.0} and read_state(path)["step"] == 5
    other = _model()
    load_weights(path, other)
    assert torch.equal(other.weight, model.weight)
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary or set-aside leftovers


def test_optimizer_round_trip_and_clear_errors(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, 1, model, opt, {"config": {}})
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    load_optimizer(path, fresh)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    with pytest.raises(CheckpointError, match="does not fit the model config") as error:
        load_weights(path, nn.Linear(5, 3))
    assert "size mismatch for weight" in str(error.value)  # which weight, not only torch's header line
    (path / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore the optimizer"):
        load_optimizer(path, fresh)
    (path / "state.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        read_state(path)


def test_error_line_unwraps_dataloader_worker_errors():
    message = (
        "Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nmmfusion.data.shards.ShardError: worker 0 of rank 0 read no usable sample\n'
    )
    assert error_line(ValueError(message)) == "worker 0 of rank 0 read no usable sample"
    assert error_line(ValueError("first\nsecond")) == "first"
