"""The audio branch: masked binding losses, training on mixed shards, encode_audio, audio queries."""

import io
import json

import numpy as np
import pytest
import soundfile
import torch

import mmfusion
from mmfusion import AudioLoadError, SearchIndex, create_model
from mmfusion.config import load_config
from mmfusion.data.audio import AudioConfig, audio_transform_for
from mmfusion.data.synthetic import ensure_synthetic_dataset, make_sample
from mmfusion.data.writer import ShardWriter
from mmfusion.models import audio as audio_tower
from mmfusion.train import train
from mmfusion.train.losses import audio_binding_loss
from tests.conftest import TINY
from tests.helpers import load_tool

AUDIO = ["model.audio.enabled=true", "model.audio.width=64", "model.audio.depth=2", "model.audio.heads=2"]
retrieve_tool = load_tool("retrieve")


def _features(n: int, dim: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1) for k in ("a", "t", "i")}
    feats["a"].requires_grad_(True)
    return {
        "audio_features": feats["a"],
        "text_features": feats["t"],
        "image_features": feats["i"],
        "logit_scale": torch.tensor(10.0),
    }


def test_batches_without_audio_give_zero_loss_and_no_nan():
    out = _features(6)
    for has_audio in (torch.zeros(6, dtype=torch.bool), torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool)):
        loss = audio_binding_loss(out, has_audio)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(out["audio_features"].grad).all()
        assert (out["audio_features"].grad == 0).all()  # present (DDP needs it) but zero
        out["audio_features"].grad = None


def test_audio_loss_uses_only_the_samples_with_audio():
    out = _features(6)
    has_audio = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    a, t, i = (out[k][has_audio].detach() for k in ("audio_features", "text_features", "image_features"))
    labels = torch.arange(4)

    def nce(x, y):  # symmetric InfoNCE, by hand
        logits = 10.0 * x @ y.T
        return (
            torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        ) / 2

    expected = (nce(a, t) + nce(a, i)) / 2
    assert audio_binding_loss(out, has_audio).item() == pytest.approx(expected.item(), rel=1e-5)
    out["text_features"] = out["text_features"].clone()
    out["text_features"][~has_audio] = 0  # rows without audio cannot change it
    assert audio_binding_loss(out, has_audio).item() == pytest.approx(expected.item(), rel=1e-5)


def test_audio_binding_does_not_pull_on_the_image_text_space():
    out = _features(6)
    for key in ("text_features", "image_features", "logit_scale"):
        out[key] = out[key].clone().requires_grad_(True)
    audio_binding_loss(out, torch.ones(6, dtype=torch.bool)).backward()
    assert out["audio_features"].grad.abs().sum() > 0
    assert all(out[k].grad is None for k in ("text_features", "image_features", "logit_scale"))


def test_audio_tower_reads_what_the_front_end_writes():
    front_end = AudioConfig()
    assert (audio_tower.SAMPLE_RATE, audio_tower.HOP_LENGTH) == (front_end.sample_rate, front_end.hop_length)
    cfg = load_config("tiny", [*TINY, *AUDIO]).model
    transform = audio_transform_for(cfg.audio)
    assert audio_tower.num_frames(cfg.audio) == transform.num_frames
    model = create_model(cfg)
    mel = transform(torch.sin(torch.arange(16000) / 10.0))[None]  # (1, n_mels, frames)
    features, tokens = model.audio(mel)
    assert features.shape == (1, cfg.embed_dim) and tokens.shape[1] == 1 + (64 // 16) * (transform.num_frames // 16)


def test_audio_binding_learns_on_a_fixed_batch_with_missing_clips():
    from mmfusion.data import ImageTransform, load_image
    from mmfusion.models import create_tokenizer
    from mmfusion.train.losses import create_contrastive_loss
    from mmfusion.train.optim import create_optimizer
    from mmfusion.train.tasks import ContrastiveTask

    cfg = load_config("tiny", [*TINY, *AUDIO, "train.lr=2e-3", "train.weight_decay=0"])
    torch.manual_seed(0)
    model = create_model(cfg.model).train()
    samples = [make_sample(i, "train", seed=0, audio=True) for i in range(16)]
    transform, audio = ImageTransform(64, cfg.model.preprocess), audio_transform_for(cfg.model.audio)
    has_audio = torch.arange(16) % 4 != 0  # a quarter of the samples come without a clip
    batch = {
        "image": torch.stack([transform(load_image(io.BytesIO(s["png"]))) for s in samples]),
        "text": create_tokenizer(32)([s["txt"].decode() for s in samples]),
        "audio": torch.stack(
            [audio(s["flac"]) if h else torch.zeros(64, 101) for s, h in zip(samples, has_audio, strict=True)]
        ),
        "has_audio": has_audio,
    }
    task = ContrastiveTask(create_contrastive_loss("clip"), torch.device("cpu"), audio_weight=1.0)
    optimizer = create_optimizer(model, cfg.train)
    history = []
    for _ in range(30):
        _, metrics = task.step(model, [batch])
        optimizer.step()
        optimizer.zero_grad()
        history.append(metrics["audio_loss"])
    assert sum(history[-5:]) / 5 < 0.5 * history[0], history


def _wav_bytes(seconds: float = 1.0, freq: float = 440.0, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory) -> dict[str, str]:
    """Synthetic scenes with sound, plus a shard mixing samples without audio and one with corrupt audio."""
    root = tmp_path_factory.mktemp("audio-data")
    patterns = ensure_synthetic_dataset(root / "synthetic", n_train=600, n_val=100, seed=0, image_size=64, audio=True)
    writer = ShardWriter(root / "mixed", prefix="mixed-")
    for i in range(40):
        sample = make_sample(10_000 + i, "train", seed=0)  # no audio
        if i == 0:
            sample["wav"] = b"RIFF\x00\x00garbage"  # corrupt: the sample is skipped and counted
        writer.write(sample)
    writer.close()
    patterns["train"] = f"{patterns['train']}::{root / 'mixed' / 'mixed-000000.tar'}"
    return patterns


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory, audio_data):
    run = tmp_path_factory.mktemp("audio-run") / "run"
    overrides = [
        *TINY, *AUDIO, "model.fusion.enabled=true", "model.fusion.depth=1", "model.fusion.heads=2",
        f"data.train={audio_data['train']}", f"data.val={audio_data['val']}", "train.tensorboard=false",
        "train.steps=24", "train.batch_size=16", "train.log_every=4", "train.lr=2e-3", "train.warmup_steps=4",
        "data.shuffle_buffer=200",
    ]  # fmt: skip
    result = train(load_config("tiny", overrides), run_dir=run, progress=False)
    return run, result


@pytest.mark.slow
def test_training_with_audio_on_mixed_shards(audio_run):
    run, result = audio_run
    assert result["skipped_samples"] >= 1  # the corrupt clip
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert all(np.isfinite(r["audio_loss"]) for r in train_lines)
    assert any(0 < r["audio_share"] < 1 for r in train_lines)  # batches mixed samples with and without audio
    metrics = result["metrics"]
    for key in ("audio_to_image_R@1", "audio_to_text_R@5", "caption_attr_acc", "text_to_image_R@1"):
        assert key in metrics, key


@pytest.mark.slow
def test_encode_audio_caption_with_audio_and_audio_queries(audio_run, tmp_path, capsys):
    run, _ = audio_run
    model = mmfusion.load(run)
    clip = tmp_path / "tone.wav"
    clip.write_bytes(_wav_bytes())
    emb = model.encode_audio([str(clip), torch.zeros(8000), clip.read_bytes()])
    assert emb.shape == (3, model.embed_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])  # a path and its bytes are the same clip

    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF1234WAVEjunk")
    with pytest.raises(AudioLoadError, match="broken.wav"):
        model.encode_audio([str(bad)])

    image = make_sample(0, "val", seed=0)["png"]
    captions = model.caption([image, image], audio=[str(clip), torch.zeros(16000)])
    assert len(captions) == 2

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(make_sample(i, "val", seed=0)["png"])
    index = SearchIndex.create(model)
    index.add_images(sorted(folder.glob("*.png")))
    index.save(tmp_path / "photos.idx")
    args = ["--index", str(tmp_path / "photos.idx"), "--checkpoint", str(run), "--k", "3"]
    assert retrieve_tool.main([*args, "--audio", str(clip)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert retrieve_tool.main([*args, "--audio", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.wav" in err and "\n" not in err
    assert retrieve_tool.main([*args, "--audio", str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_fusion_head_hears_audio_and_ignores_missing_clips():
    cfg = load_config(
        "tiny", [*TINY, *AUDIO, "model.fusion.enabled=true", "model.fusion.depth=1", "model.fusion.heads=2"]
    )
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    from mmfusion.models import create_tokenizer

    tokens = create_tokenizer(32)(["a red circle", "a blue star"])
    _, image_tokens = model.visual(torch.randn(2, 3, 64, 64))
    _, audio_tokens = model.audio(torch.randn(2, 64, 101))
    _, states = model.text(tokens)
    head = model.fusion
    image_only = head.fuse(head.memory(image_tokens)[0], states)
    memory, mask = head.memory(image_tokens, audio_tokens, torch.tensor([True, False]))
    with_audio = head.fuse(memory, states, key_mask=mask)
    assert not torch.allclose(with_audio[0], image_only[0], atol=1e-4)  # the clip changes what is fused
    torch.testing.assert_close(with_audio[1], image_only[1], atol=1e-5, rtol=0)  # a missing clip is not heard
