"""Shards, decoding of awkward images, bad-sample handling, and exact-resume of the stream."""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import PreprocessConfig
from mmfusion.data import (
    ImageTransform,
    ShardError,
    ShardStream,
    StreamPosition,
    caption_token_counts,
    count_samples,
    expand_shards,
    load_image,
    make_loader,
)
from mmfusion.data.writer import ShardWriter
from mmfusion.models import create_tokenizer


def _png(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _write_shards(tmp_path, n_shards=3, per_shard=10, bad_every=0):
    keys = []
    with ShardWriter(tmp_path, samples_per_shard=per_shard) as w:
        for i in range(n_shards * per_shard):
            color = (i * 7 % 256, i * 13 % 256, i * 29 % 256)
            image = _png(Image.new("RGB", (64, 64), color))
            if bad_every and i % bad_every == bad_every - 1:
                image = b"this is not an image"
            w.write({"__key__": f"{i:06d}", "png": image, "txt": f"sample {i}".encode()})
            keys.append(f"{i:06d}")
    return f"{tmp_path}/{{000000..{n_shards - 1:06d}}}.tar", keys


def test_load_image_handles_modes():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white, not black or red
    assert load_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 3)
    assert load_image(_png(palette)).mode == "RGB"
    gray = Image.new("L", (8, 8), 100)
    assert load_image(_png(gray)).getpixel((0, 0)) == (100, 100, 100)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    r, g, b = load_image(_png(cmyk, fmt="JPEG")).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert load_image(_png(deep)).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_applies_exif_rotation():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = load_image(_png(image, fmt="JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (10, 20)
    assert decoded.getpixel((5, 3))[0] > 200  # the red half is now on top


def test_load_image_rejects_non_images():
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        load_image(b"not an image")


def test_transform_shapes_and_determinism():
    pre = PreprocessConfig()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    t_eval = ImageTransform(64, pre)
    assert t_eval(image).shape == (3, 64, 64)
    t_train = ImageTransform(64, pre, train=True, crop_scale_min=0.5)
    import random

    a, b = t_train(image, random.Random(1)), t_train(image, random.Random(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, t_train(image, random.Random(2)))


def test_expand_shards_errors(tmp_path):
    with pytest.raises(ShardError, match="matches no file"):
        expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(ShardError, match="no such file.*000001.tar"):
        expand_shards(str(tmp_path / "{000001..000002}.tar"))
    with pytest.raises(ShardError, match="empty"):
        expand_shards("")
    pattern, _ = _write_shards(tmp_path, n_shards=2)
    assert len(expand_shards(pattern)) == 2
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 2
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]


def _stream(pattern, train=True, start=None, batch_size=4, **kw):
    transform = ImageTransform(64, PreprocessConfig(), train=train)
    return ShardStream(
        expand_shards(pattern), batch_size, transform, create_tokenizer(32), train=train, seed=3, start=start, **kw
    )


def test_eval_stream_reads_everything_once(tmp_path):
    pattern, keys = _write_shards(tmp_path)
    seen = [k for b in make_loader(_stream(pattern, train=False), 0) for k in b["key"]]
    assert sorted(seen) == keys


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    pattern, keys = _write_shards(tmp_path, bad_every=5)
    batches = list(make_loader(_stream(pattern, train=False), 0))
    assert sum(b["skipped"] for b in batches) == 6
    assert len([k for b in batches for k in b["key"]]) == len(keys) - 6


def test_truncated_shard_is_skipped_not_fatal(tmp_path):
    pattern, keys = _write_shards(tmp_path)
    shard = tmp_path / "000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut mid-member
    batches = list(make_loader(_stream(pattern, train=False), 0))
    seen = [k for b in batches for k in b["key"]]
    assert 20 <= len(seen) < 30  # the two intact shards, plus whatever came before the cut
    assert sum(b["skipped"] for b in batches) >= 1
    assert count_samples(expand_shards(pattern)) < 30


def test_caption_token_counts_read_the_first_captions_and_skip_bad_data(tmp_path):
    pattern, _ = _write_shards(tmp_path)  # captions "sample 0" .. "sample 29"
    tokenizer = create_tokenizer(32)
    urls = expand_shards(pattern)
    counts = caption_token_counts(urls, tokenizer, 49408, max_samples=12)
    expected = torch.zeros(49408, dtype=torch.long)
    for ids in tokenizer([f"sample {i}" for i in range(12)]):
        for i in ids[ids != 0].tolist():
            expected[i] += 1
    assert torch.equal(counts, expected)
    assert counts[tokenizer.encoder["sample</w>"]] == 12 and counts[tokenizer.eot_token_id] == 12

    shard = tmp_path / "000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut mid-member: counted up to the cut, the rest goes on
    counts = caption_token_counts(urls, tokenizer, 49408)
    assert 20 < counts[tokenizer.encoder["sample</w>"]] < 30


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_exact_batches(tmp_path, workers):
    """Stopping after k batches and restarting from the recorded position yields the same next batches."""
    pattern, _ = _write_shards(tmp_path, n_shards=4, per_shard=7)
    straight = [b for b in itertools.islice(make_loader(_stream(pattern), workers), 20)]
    position = StreamPosition(workers)
    for b in straight[:9]:
        position.update(b)
    resumed = list(itertools.islice(make_loader(_stream(pattern, start=position.state()), workers), 11))
    assert [b["key"] for b in resumed] == [b["key"] for b in straight[9:]]
    for a, b in zip(resumed, straight[9:], strict=True):
        assert torch.equal(a["image"], b["image"])  # same augmentation too
    epochs = {b["epoch"] for b in straight}
    assert len(epochs) > 1  # the test crossed an epoch boundary


def test_epochs_reshuffle_and_ranks_partition(tmp_path):
    pattern, keys = _write_shards(tmp_path, n_shards=4, per_shard=6)
    per_rank = []
    for rank in range(2):
        stream = _stream(pattern, rank=rank, world_size=2, batch_size=6)
        batches = list(itertools.islice(make_loader(stream, 0), 4))  # 2 epochs of 12 samples
        per_rank.append(batches)
    first_epoch = [k for r in per_rank for b in r[:2] for k in b["key"]]
    assert sorted(first_epoch) == keys  # the ranks split one epoch without overlap
    assert [b["key"] for b in per_rank[0][:2]] != [b["key"] for b in per_rank[0][2:]]  # next epoch: new order


def test_stream_over_only_bad_data_fails_instead_of_hanging(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("readme.md")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ShardError, match="no usable sample"):
        next(iter(make_loader(_stream(str(bad)), 0)))
