"""Text-to-image end to end: the two-stage recipe in tools/train.py, resume, the API and tools/generate.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmfusion
from mmfusion.config import load_config
from mmfusion.data.synthetic import make_sample
from mmfusion.train.checkpoint import find_checkpoint
from mmfusion.train.loop import train
from tests.helpers import ROOT, load_tool

train_tool = load_tool("train")
generate_tool = load_tool("generate")
SMALL = [
    "model.text.width=64", "model.text.depth=1", "model.text.heads=2",
    "model.image_tokenizer.channels=[8, 16, 16, 16]", "model.generator.width=32", "model.generator.depth=1",
    "model.generator.heads=2", "train.batch_size=8", "train.tokenizer_steps=6", "train.steps=6",
    "train.log_every=2", "train.warmup_steps=2", "train.tensorboard=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, synthetic):
    run = tmp_path_factory.mktemp("gen") / "run"
    args = ["--config", "tiny-gen", "--run-dir", str(run), "--no-progress", *SMALL,
            f"data.train={synthetic['train']}", f"data.val={synthetic['val']}"]  # fmt: skip
    assert train_tool.main(args) == 0
    return run


@pytest.mark.slow
def test_two_stages_train_and_report_their_metrics(gen_run):
    assert json.loads((gen_run / "stages.json").read_text())["stages"] == ["tokenizer", "generator"]
    stage1 = [json.loads(x) for x in (gen_run / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    stage2 = [json.loads(x) for x in (gen_run / "generator" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stage1 if "loss" in r][-1] == 6 and [r["step"] for r in stage2 if "loss" in r][-1] == 6
    tok_eval = next(r["eval"] for r in stage1 if "eval" in r)
    assert tok_eval["psnr"] > 0 and 0 < tok_eval["codebook_usage"] <= 100
    gen_eval = next(r["eval"] for r in stage2 if "eval" in r)
    assert "val_loss" in gen_eval and "color_acc" in gen_eval
    assert 0 <= gen_eval["recon/color_acc"] <= 100 and "recon/position_acc" in gen_eval  # the tokenizer's ceiling
    # Stage 2 read the training images as tokens, encoded once by stage 1's tokenizer.
    manifest = json.loads((gen_run / "generator" / "tokens" / "manifest.json").read_text())
    assert (manifest["samples"], manifest["skipped_samples"]) == (1200, 0)
    assert manifest["tokenizer"] == str(find_checkpoint(gen_run / "tokenizer").resolve())
    # Stage 2 started from stage 1's tokenizer and kept it frozen.
    a = load_file(str(find_checkpoint(gen_run / "tokenizer") / "model.safetensors"))
    b = load_file(str(find_checkpoint(gen_run / "generator") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_generator_can_encode_images_on_the_fly(gen_run, synthetic, tmp_path):
    overrides = [*SMALL, "train.pretokenize=false", "train.steps=2", f"data.train={synthetic['train']}", "data.val="]
    overrides.append(f"model.tokenizer_checkpoint={gen_run / 'tokenizer'}")
    overrides.append("model.generator.kind=masked")  # the other generator kind, end to end
    result = train(load_config("tiny-gen", overrides), run_dir=tmp_path / "gen", progress=False)
    assert result["step"] == 2 and not (tmp_path / "gen" / "tokens").exists()
    model = mmfusion.load(tmp_path / "gen")
    a, b = (model.generate("a red circle", n=2, steps=2, seed=0) for _ in range(2))
    assert len(a) == 2 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_resume_skips_finished_stages(gen_run, capsys):
    before = sorted(p.name for p in (gen_run / "generator" / "checkpoints").iterdir())
    assert train_tool.main(["--resume", str(gen_run), "--no-progress"]) == 0
    assert sorted(p.name for p in (gen_run / "generator" / "checkpoints").iterdir()) == before
    assert "training" not in capsys.readouterr().out  # nothing was trained again


@pytest.mark.slow
def test_api_tokenize_decode_generate(gen_run):
    model = mmfusion.load(gen_run)
    image = Image.open(__import__("io").BytesIO(make_sample(0, "val", seed=0)["png"]))
    tokens = model.tokenize_image([image, image])
    assert tokens.shape == (2, 8, 8) and tokens.dtype == torch.long
    decoded = model.decode_tokens(tokens)
    assert len(decoded) == 2 and decoded[0].size == (64, 64)
    a = model.generate(["a red circle", "a blue star"], n=2, seed=0)
    b = model.generate(["a red circle", "a blue star"], n=2, seed=0)
    c = model.generate(["a red circle", "a blue star"], n=2, seed=1, guidance=3.0, top_k=5)
    assert len(a) == 4 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c, strict=True))
    with pytest.raises(ValueError, match="steps applies to masked generators"):
        model.generate("a red circle", steps=3)  # tiny-gen's generator is autoregressive: one step per token
    for bad in ("", "   ", "word " * 40):
        with pytest.raises(ValueError, match="prompt"):
            model.generate(bad)


@pytest.mark.slow
def test_generate_tool(gen_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["--checkpoint", str(gen_run), "--n", "4", "--guidance", "2", "--top-k", "10", "--out", str(out)]
    assert generate_tool.main([*args, "--text", "a small red star above a blue square"]) == 0
    grid = Image.open(out)
    assert grid.size[0] > 64 and grid.size[1] > 64  # a 2x2 grid with padding
    for bad, why in (("", "empty"), ("a \udcff star", "UTF-8"), ("star " * 40, "tokens")):
        assert generate_tool.main([*args, "--text", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and "\n" not in err
    assert generate_tool.main([*args, "--steps", "4", "--text", "a red star"]) == 2
    assert "steps applies to masked generators" in capsys.readouterr().err
    assert generate_tool.main([*args, "--top-k", "-1", "--text", "a red star"]) == 2
    assert "top_k must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_prompt_and_reconstruction_grids(gen_run, tmp_path):
    demo = load_tool("text_to_image", ROOT / "demos")
    out, recon = tmp_path / "demo.png", tmp_path / "recon.png"
    args = ["--checkpoint", str(gen_run), "--n", "2", "--out", str(out), "--recon-out", str(recon)]
    assert demo.main([*args, "a red circle", "a blue star"]) == 0
    assert Image.open(out).size[1] > 2 * 64 and Image.open(recon).size[0] > 8 * 64
