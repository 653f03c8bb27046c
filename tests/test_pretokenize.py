"""Pre-tokenized generator shards: the tokenizer's exact ids, bad samples skipped and counted, the cache reused when
it still fits and rebuilt when it does not, and nothing half-written left behind."""

import io

import numpy as np
import pytest
import torch

from mmfusion.config import PreprocessConfig, load_config
from mmfusion.data import ImageTransform, ShardError, ShardStream, count_samples, expand_shards, load_image
from mmfusion.data.shards import decode_tokens, encode_tokens
from mmfusion.data.synthetic import make_sample
from mmfusion.data.writer import ShardWriter
from mmfusion.models import create_tokenizer
from mmfusion.models.text_to_image import ImageTokenizerModel, TextToImageModel
from mmfusion.train import checkpoint as ckpt_io
from mmfusion.train import pretokenize
from mmfusion.train.loop import train

CPU = torch.device("cpu")
SMALL = [
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
    "model.image_tokenizer.channels=[8, 16, 16, 16]", "model.generator.width=32", "model.generator.depth=1",
    "model.generator.heads=2", "train.batch_size=4", "train.tensorboard=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, synthetic):
    run = tmp_path_factory.mktemp("tokenizer") / "run"
    overrides = [*SMALL, "model.kind=image_tokenizer", "train.steps=2", "train.warmup_steps=1"]
    overrides += [f"data.train={synthetic['train']}", f"data.val={synthetic['val']}"]
    train(load_config("tiny-gen", overrides), run_dir=run, progress=False)
    return run


def _shards(folder, n=10, bad=(3,)):
    """Two shards of synthetic samples; the images of the ``bad`` indices are not images."""
    with ShardWriter(folder, samples_per_shard=n // 2) as writer:
        for i in range(n):
            sample = make_sample(i, "train", seed=0)
            writer.write({**sample, "png": b"not a png" if i in bad else sample["png"]})
    return expand_shards(f"{folder}/{{000000..000001}}.tar")


def _cfg(tokenizer_run):
    return load_config("tiny-gen", [*SMALL, f"model.tokenizer_checkpoint={tokenizer_run}"])


def _read(urls):
    transform = ImageTransform(64, PreprocessConfig())
    batches = list(ShardStream(urls, 4, transform, lambda captions: captions, train=False, image_tokens=True))
    tokens = {k: t for b in batches if b["key"] for k, t in zip(b["key"], b["image_tokens"], strict=True)}
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"], strict=True)}
    return tokens, captions, sum(b["skipped"] for b in batches)


def test_tokens_are_the_tokenizers_and_bad_samples_are_counted(tmp_path, tokenizer_run):
    cfg = _cfg(tokenizer_run)
    urls, manifest = pretokenize.pretokenize_shards(cfg, _shards(tmp_path / "src"), tmp_path / "gen", CPU)
    assert (manifest["samples"], manifest["skipped_samples"]) == (9, 1)
    assert count_samples(urls) == 9  # what an epoch-based run plans its steps from
    tokens, captions, skipped = _read(urls)
    assert skipped == 0 and len(tokens) == 9 and f"{3:06d}" not in tokens
    holder = ImageTokenizerModel(cfg.model)
    ckpt_io.load_submodule(tokenizer_run, holder, "tokenizer")
    transform = ImageTransform(64, cfg.model.preprocess)
    for i in (0, 7):
        sample = make_sample(i, "train", seed=0)
        with torch.no_grad():
            want = holder.tokenizer.eval().encode(transform(load_image(sample["png"]))[None])[0]
        assert torch.equal(tokens[sample["__key__"]], want)
        assert captions[sample["__key__"]] == sample["txt"].decode()
    assert not list((tmp_path / "gen").glob(".tokens-partial-*"))


def test_cache_is_reused_when_it_fits_and_rebuilt_when_not(tmp_path, tokenizer_run, monkeypatch):
    cfg, sources = _cfg(tokenizer_run), _shards(tmp_path / "src")
    first, _ = pretokenize.pretokenize_shards(cfg, sources, tmp_path / "gen", CPU, progress=False)
    stamp = (tmp_path / "gen" / "tokens" / "manifest.json").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(pretokenize, "encode_tokens", lambda t: calls.append(1) or encode_tokens(t))
    again, _ = pretokenize.pretokenize_shards(cfg, sources, tmp_path / "gen", CPU, progress=False)
    assert again == first and not calls
    assert (tmp_path / "gen" / "tokens" / "manifest.json").stat().st_mtime_ns == stamp
    # Other sources: rebuilt, holding only the new ones.
    _, manifest = pretokenize.pretokenize_shards(cfg, sources[:1], tmp_path / "gen", CPU, progress=False)
    assert manifest["samples"] == 4 and len(calls) == 4


def test_remote_sources_are_read_without_counting_them_first(tmp_path, tokenizer_run):
    sources = [f"pipe:cat {url}" for url in _shards(tmp_path / "src")]  # not countable from tar headers
    _, manifest = pretokenize.pretokenize_shards(_cfg(tokenizer_run), sources, tmp_path / "gen", CPU, progress=False)
    assert (manifest["samples"], manifest["skipped_samples"]) == (9, 1)


def test_shards_without_a_usable_sample_are_a_clear_error(tmp_path, tokenizer_run):
    sources = _shards(tmp_path / "src", n=4, bad=range(4))
    with pytest.raises(ShardError, match=r"no usable sample .*000000\.tar.*4 bad samples"):
        pretokenize.pretokenize_shards(_cfg(tokenizer_run), sources, tmp_path / "gen", CPU, progress=False)
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == []  # no cache, no partial folder


def test_an_interrupted_pass_leaves_no_cache(tmp_path, tokenizer_run, monkeypatch):
    def fail(tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretokenize, "encode_tokens", fail)
    with pytest.raises(KeyboardInterrupt):
        pretokenize.pretokenize_shards(_cfg(tokenizer_run), _shards(tmp_path / "src"), tmp_path / "gen", "cpu")
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == []
    # A process killed outright cannot clean up; the next pass removes what it left.
    (tmp_path / "gen" / ".tokens-partial-killed").mkdir()
    monkeypatch.undo()
    sources = _shards(tmp_path / "src2")
    pretokenize.pretokenize_shards(_cfg(tokenizer_run), sources, tmp_path / "gen", CPU, progress=False)
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["tokens"]


def test_token_members_never_unpickle_and_bad_ones_are_skipped(tmp_path):
    ids = torch.tensor([[1, 2], [3, 999]])
    assert torch.equal(decode_tokens(encode_tokens(ids)), ids)
    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad in (objects.getvalue(), encode_tokens(torch.zeros(4, dtype=torch.long)), b"junk"):
        with pytest.raises(ValueError):
            decode_tokens(bad)
    with ShardWriter(tmp_path) as writer:
        writer.write({"__key__": "a", "tokens.npy": encode_tokens(ids), "txt": b"a red circle"})
        writer.write({"__key__": "b", "tokens.npy": b"junk", "txt": b"a blue star"})
    tokens, _, skipped = _read([str(tmp_path / "000000.tar")])
    assert list(tokens) == ["a"] and skipped == 1


def test_model_loss_is_the_same_from_images_or_their_tokens(tokenizer_run):
    cfg = _cfg(tokenizer_run)
    model = TextToImageModel(cfg.model).train()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    text = create_tokenizer(32)(["a red circle", "a small blue star at the top", "a green heart"])
    with torch.no_grad():
        tokens = model.tokenizer.encode(images)
        torch.manual_seed(0)
        from_images = model({"image": images, "text": text})["loss"]
        torch.manual_seed(0)
        from_tokens = model({"image_tokens": tokens, "text": text})["loss"]
    assert torch.equal(from_images, from_tokens)
