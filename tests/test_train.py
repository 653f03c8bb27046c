"""End-to-end training: tools/train.py main(), exact resume, bad input, learning above chance."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmfusion.config import load_config
from mmfusion.train import train
from tests.conftest import tiny_overrides
from tests.helpers import load_tool

train_tool = load_tool("train")


def _weights(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_at_the_exact_sample(tmp_path, synthetic, workers):
    """N steps straight == k steps, a crash, --resume, N-k steps."""
    args = tiny_overrides(
        synthetic, "train.steps=6", "train.batch_size=16", "train.checkpoint_every=3", "train.precision=fp32",
        f"data.workers={workers}", "data.val=", "train.log_every=1",
    )  # fmt: skip
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert train_tool.main(["--run-dir", str(straight), "--no-progress", *args]) == 0
    assert train_tool.main(["--run-dir", str(crashed), "--no-progress", *args]) == 0
    # Simulate a crash right after the step-3 checkpoint: drop step 6 and point latest back at step 3.
    shutil.rmtree(crashed / "checkpoints" / "step_000006")
    (crashed / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step_000003"}))
    state = json.loads((crashed / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["step"] == 3 and state["data"][0]["workers"]  # positions recorded per worker
    assert train_tool.main(["--resume", str(crashed), "--no-progress"]) == 0

    a, b = _weights(straight, 6), _weights(crashed, 6)
    moved = _weights(crashed, 3)
    assert any(not torch.equal(a[k], moved[k]) for k in a)  # steps 4-6 changed the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_training_logs_metrics_and_checkpoints(tmp_path, synthetic, capsys):
    run = tmp_path / "run"
    args = tiny_overrides(synthetic, "train.steps=4", "train.batch_size=8", "train.log_every=2", "train.keep_last=1")
    assert train_tool.main(["--run-dir", str(run), "--no-progress", *args, "train.checkpoint_every=2"]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "checkpoint:" in out
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4]
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in train_lines)
    assert any("eval" in r and "text_to_image_R@1" in r["eval"] for r in lines)
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000004"]  # keep_last=1
    assert not list((run / "checkpoints").glob(".*"))  # no temporary leftovers
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 4 and saved["model"]["vision"]["width"] == 64  # the resolved config


def test_accumulation_and_siglip_run(tmp_path, synthetic):
    overrides = ["train.steps=2", "train.batch_size=4", "train.accum_steps=2", "train.loss=siglip", "data.val="]
    cfg = load_config("tiny", tiny_overrides(synthetic, *overrides))
    result = train(cfg, run_dir=tmp_path / "run", progress=False)
    assert result["step"] == 2
    assert result["model"].logit_bias is not None  # siglip turns the bias on, and it is saved
    state = json.loads((Path(result["checkpoint"]) / "state.json").read_text())
    assert state["config"]["model"]["logit_bias"] is True


def test_bad_input_gives_one_line_errors(tmp_path, synthetic, capsys):
    assert train_tool.main(["--run-dir", str(tmp_path / "r"), "train.epoch=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown key 'train.epoch'") and "\n" not in err
    assert (
        train_tool.main(
            ["--run-dir", str(tmp_path / "r"), *tiny_overrides(synthetic), f"data.train={tmp_path}/none-{{0..3}}.tar"]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert train_tool.main(["--resume", str(tmp_path / "nothing-here")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert train_tool.main(["--config", "nonexistent"]) == 2
    assert "available: " in capsys.readouterr().err
    assert (
        train_tool.main(
            ["--run-dir", str(tmp_path / "r"), "train.device=cuda" if not torch.cuda.is_available() else "train.loss=x"]
        )
        == 2
    )
    assert "error: " in capsys.readouterr().err


def test_a_new_run_never_mixes_into_an_old_one(tmp_path, synthetic, capsys):
    run = tmp_path / "run"
    args = ["--run-dir", str(run), "--no-progress", *tiny_overrides(synthetic, "train.steps=1", "data.val=")]
    assert train_tool.main(args) == 0
    assert train_tool.main(args) == 2
    assert f"already holds a run; continue it with --resume {run}" in capsys.readouterr().err
    assert train_tool.main(["--resume", str(run), "model.vision.depth=3"]) == 2
    assert "cannot change on --resume" in capsys.readouterr().err


def test_corrupt_samples_are_counted_and_the_run_goes_on(tmp_path, synthetic):
    from mmfusion.data import expand_shards

    shards = tmp_path / "shards"
    shards.mkdir()
    for src in expand_shards(synthetic["train"]):
        shutil.copy(src, shards)
    victim = sorted(shards.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated shard
    overrides = ["train.steps=3", "train.batch_size=8", "data.val=", f"data.train={shards}/*.tar"]
    cfg = load_config("tiny", tiny_overrides(synthetic, *overrides))
    result = train(cfg, run_dir=tmp_path / "run", progress=False)
    assert result["step"] == 3


@pytest.mark.slow
def test_short_training_learns_well_above_chance(tmp_path, synthetic):
    overrides = ["train.steps=150", "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=10"]
    cfg = load_config("tiny", tiny_overrides(synthetic, *overrides))
    result = train(cfg, run_dir=tmp_path / "run", progress=False)
    r1 = result["metrics"]["text_to_image_R@1"]
    untrained = train(
        load_config("tiny", tiny_overrides(synthetic, "train.steps=1", "train.lr=0")),
        run_dir=tmp_path / "u",
        progress=False,
    )
    chance = untrained["metrics"]["text_to_image_R@1"]
    assert chance < 3  # ~1/200 images, a few more through repeated captions
    assert r1 > 4 and r1 > 4 * chance, result["metrics"]


def test_auto_precision_is_bf16_only_where_the_device_computes_it_faster(monkeypatch):
    """CPUs without bf16 instructions emulate it many times slower than fp32, and with AVX512-BF16 but no AMX the
    casts cost more than they save (precision.py has the timings): ``auto`` picks bf16 on a CPU only with both."""
    from mmfusion.train import precision

    cpu = torch.device("cpu")
    for native, amx, expected in ((True, True, "bf16"), (True, False, "fp32"), (False, True, "fp32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert precision.resolve_precision(cpu, "auto") == expected
        assert precision.ComputeContext(cpu, "auto").precision == expected
        assert precision.resolve_precision(cpu, "fp32") == "fp32"  # an explicit choice is kept
        assert precision.resolve_precision(cpu, "bf16") == "bf16"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the private check: stay in fp32
    assert precision.resolve_precision(cpu, "auto") == "fp32"
    with precision.ComputeContext(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with precision.ComputeContext(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert load_config("tiny").train.precision == "auto"
