"""Two-process DDP on CPU (gloo) through torchrun: every rank must end with identical weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_torchrun_two_ranks_end_identical(tmp_path, synthetic):
    run = tmp_path / "run"
    run.mkdir()
    overrides = tiny_overrides(
        synthetic, "train.steps=4", "train.batch_size=8", "train.threads=1", "data.workers=1",
        "train.checkpoint_every=2", "train.log_every=1", "train.accum_steps=2",
    )  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), str(run), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = {p.name: p.read_text() for p in run.glob("rank*.sha256")}
    assert len(digests) == 2 and len(set(digests.values())) == 1, digests

    state = json.loads((run / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2  # one data position per rank
    first = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    last = load_file(str(run / "checkpoints" / "step_000004" / "model.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert records and all(r["samples_per_s"] > 0 for r in records)
    assert '"eval"' in (run / "metrics.jsonl").read_text()  # rank 0 evaluated while rank 1 waited
