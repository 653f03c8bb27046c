"""mmfusion.load and the embedding API; tools/eval.py; tools/make_shards.py."""

import io
import json
import shutil

import pytest
import torch
from PIL import Image

import mmfusion
from mmfusion.config import load_config
from mmfusion.train import train
from tests.conftest import tiny_overrides
from tests.helpers import load_tool


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic):
    run = tmp_path_factory.mktemp("api") / "run"
    train(
        load_config("tiny", tiny_overrides(synthetic, "train.steps=3", "train.batch_size=8")),
        run_dir=run,
        progress=False,
    )
    return run


def test_load_and_encode(run_dir, tmp_path):
    model = mmfusion.load(run_dir)
    path = tmp_path / "red.png"
    Image.new("RGB", (80, 60), (255, 0, 0)).save(path)
    images = model.encode_image([Image.new("RGBA", (64, 64), (0, 0, 255, 128)), str(path), path.read_bytes()])
    texts = model.encode_text(["a red circle", "a small blue square on the left"])
    assert images.shape == (3, model.embed_dim) and texts.shape == (2, model.embed_dim)
    assert images.dtype == torch.float32 and texts.dtype == torch.float32
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(images[1], images[2])  # a path and its bytes are the same image
    assert model.encode_text("a red circle").shape == (1, model.embed_dim)
    assert len(model.fingerprint) == 16


def test_checkpoint_alone_rebuilds_the_model(run_dir, tmp_path):
    """Copy only the checkpoint folder elsewhere: the model and its preprocessing come back identical."""
    ckpt = next((run_dir / "checkpoints").glob("step_*"))
    moved = tmp_path / "elsewhere"
    shutil.copytree(ckpt, moved)
    a, b = mmfusion.load(run_dir), mmfusion.load(moved)
    assert a.config == b.config
    image = Image.new("RGB", (64, 64), (0, 200, 0))
    torch.testing.assert_close(a.encode_image([image]), b.encode_image([image]), rtol=0, atol=0)


def test_bad_inputs_give_clear_errors(run_dir, tmp_path):
    model = mmfusion.load(run_dir)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    with pytest.raises(mmfusion.ImageLoadError, match="notes.jpg"):
        model.encode_image([str(not_image)])
    with pytest.raises(mmfusion.ImageLoadError, match="missing.png"):
        model.encode_image([str(tmp_path / "missing.png")])
    from mmfusion.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        mmfusion.load(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(next((run_dir / "checkpoints").glob("step_*")), broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        mmfusion.load(broken)


def test_eval_tool_prints_one_json_object(run_dir, synthetic, capsys):
    assert load_tool("eval").main(["--checkpoint", str(run_dir), "--shards", synthetic["val"]]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    metrics = json.loads(out[0])
    expected = mmfusion.load(run_dir).evaluate(synthetic["val"])
    assert metrics == pytest.approx(expected)
    assert {"text_to_image_R@1", "image_to_text_R@10", "unseen/text_to_image_R@1", "zero_shot_top1"} <= set(metrics)
    assert load_tool("eval").main(["--checkpoint", str(run_dir), "--shards", "/nowhere/*.tar"]) == 2
    assert "matches no file" in capsys.readouterr().err


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_make_shards_from_folder_skips_and_lists_bad_files(tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(_jpeg((255, 0, 0)))
    (photos / "a.txt").write_text("a red square")
    (photos / "sub" / "b.png").write_bytes(_jpeg((0, 255, 0)))  # wrong suffix, still an image
    (photos / "sub" / "b.txt").write_text("a green square")
    Image.new("P", (16, 16)).save(photos / "c.gif")
    (photos / "c.txt").write_text("a gif")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (photos / "broken.txt").write_text("unreadable")
    (photos / "nocap.jpg").write_bytes(_jpeg((0, 0, 255)))
    out = tmp_path / "shards"
    assert load_tool("make_shards").main(["--images", str(photos), "--out", str(out), "--samples-per-shard", "2"]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 samples in 2 shards" in captured.out and "skipped 2" in captured.out
    assert "broken.jpg" in captured.err and "nocap.jpg: no caption" in captured.err

    from mmfusion.data import ImageTransform, ShardStream, expand_shards, make_loader
    from mmfusion.models import create_tokenizer

    transform = ImageTransform(64, load_config("tiny").model.preprocess)
    stream = ShardStream(expand_shards(f"{out}/*.tar"), 8, transform, create_tokenizer(32), train=False)
    batch = next(iter(make_loader(stream, 0)))
    assert sorted(batch["caption"]) == ["a gif", "a green square", "a red square"]
    assert {json.loads(j)["path"] for j in batch["json"]} == {"a.jpg", "sub/b.png", "c.gif"}


def test_make_shards_from_tables(tmp_path, capsys):
    (tmp_path / "x.jpg").write_bytes(_jpeg((10, 20, 30)))
    (tmp_path / "table.csv").write_text("path,caption,label\nx.jpg,a dark square,dark\nmissing.jpg,gone,none\n")
    (tmp_path / "table.jsonl").write_text(json.dumps({"path": "x.jpg", "caption": "from jsonl"}) + "\n")
    tool = load_tool("make_shards")
    assert tool.main(["--table", str(tmp_path / "table.csv"), "--out", str(tmp_path / "csv")]) == 0
    assert "wrote 1 samples" in capsys.readouterr().out
    assert tool.main(["--table", str(tmp_path / "table.jsonl"), "--out", str(tmp_path / "jsonl")]) == 0
    (tmp_path / "bad.csv").write_text("file,text\nx.jpg,hi\n")
    assert tool.main(["--table", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "bad")]) == 2
    assert "needs 'path' and 'caption'" in capsys.readouterr().err
    assert tool.main(["--images", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "rows.jsonl").write_text("[1, 2]\n")
    assert tool.main(["--table", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "row 1 needs 'path' and 'caption'" in capsys.readouterr().err
    assert tool.main(["--table", str(tmp_path / "table.csv"), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_make_shards_audio_column(tmp_path, capsys):
    import tarfile

    import numpy as np
    import soundfile as sf

    (tmp_path / "x.jpg").write_bytes(_jpeg((10, 20, 30)))
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    sf.write(tmp_path / "good.wav", tone, 16000, subtype="PCM_16")
    sf.write(tmp_path / "loud.FLAC", tone, 8000, format="FLAC")  # suffix case does not matter
    sf.write(tmp_path / "disguised.wav", tone, 8000, format="FLAC")  # FLAC bytes under a .wav name
    (tmp_path / "notes.wav").write_text("not audio at all")
    rows = ["with wav,good.wav", "with flac,loud.FLAC", "gone,missing.wav", "text,notes.wav", "silent,"]
    rows.append("flac as wav,disguised.wav")
    table = tmp_path / "clips.csv"
    table.write_text("path,caption,audio\n" + "".join(f"x.jpg,{row}\n" for row in rows))
    out = tmp_path / "shards"
    assert load_tool("make_shards").main(["--table", str(table), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 samples in 1 shards" in captured.out and "skipped 3" in captured.out
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 3
    for name in ("missing.wav", "notes.wav", "disguised.wav"):  # one line per bad file, as for images
        assert sum(line.startswith(f"skipped {tmp_path / name}: not a readable WAV/FLAC file") for line in skipped) == 1
    with tarfile.open(out / "000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members["000000000.wav"] == (tmp_path / "good.wav").read_bytes()
    assert members["000000001.flac"] == (tmp_path / "loud.FLAC").read_bytes()
    assert members["000000002.txt"] == b"silent"  # the empty audio cell: a sample without an audio member
    assert sorted(members) == sorted(
        ["000000000.jpg", "000000000.txt", "000000000.wav", "000000000.json"]
        + ["000000001.jpg", "000000001.txt", "000000001.flac", "000000001.json"]
        + ["000000002.jpg", "000000002.txt", "000000002.json"]
    )
    assert json.loads(members["000000000.json"])["audio"] == "good.wav"
    # jsonl: a null or missing audio value also means no audio
    lines = [{"path": "x.jpg", "caption": "a", "audio": None}, {"path": "x.jpg", "caption": "b", "audio": "good.wav"}]
    (tmp_path / "clips.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert load_tool("make_shards").main(["--table", str(tmp_path / "clips.jsonl"), "--out", str(tmp_path / "j")]) == 0
    with tarfile.open(tmp_path / "j" / "000000.tar") as tar:
        assert [n for n in tar.getnames() if n.endswith(".wav")] == ["000000001.wav"]
