"""Sound clips of synthetic scenes: determinism, attribute -> sound mapping, FLAC, and the audio dataset variant."""

from __future__ import annotations

import itertools
import math
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import torch

from mmfusion.data import synthetic as S
from mmfusion.data import synthetic_audio as A
from mmfusion.data.audio import LogMel, load_audio

SR = A.SAMPLE_RATE


def _scene(shape: str = "circle", color: str = "red", size: str = "large", position: str = "center") -> dict:
    return {"objects": [{"shape": shape, "color": color, "size": size, "position": position}]}


def _read_shards(pattern: str) -> list[bytes]:
    return [Path(p).read_bytes() for p in braceexpand.braceexpand(pattern)]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_constants_cover_the_dataset_and_stay_apart():
    assert set(A.COLOR_FREQS) == set(S.COLORS) and set(A.SHAPE_TIMBRES) == set(S.SHAPES)
    assert set(A.SIZE_LEVELS) == set(S.SIZES) and A.SIZE_LEVELS["large"] > 2 * A.SIZE_LEVELS["small"]
    assert len(set(A.SHAPE_TIMBRES.values())) == len(S.SHAPES), "every shape needs its own recipe x rhythm"
    assert all(recipe in A.HARMONIC_RECIPES for recipe, _ in A.SHAPE_TIMBRES.values())
    mel = np.sort([2595 * math.log10(1 + f / 700) for f in A.COLOR_FREQS.values()])
    band = 2595 * math.log10(1 + 8000 / 700) / 65  # spacing of the 64 LogMel bands over 0-8 kHz
    assert np.diff(mel).min() > 2 * band


def test_render_is_deterministic_and_well_formed():
    scene = S.sample_scene(S._sample_rng(0, "val", 3), "val")
    a, b = A.render_audio(scene), A.render_audio(scene)
    assert a.dtype == np.float32 and a.shape == (SR,)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 1.0
    assert abs(a[0]) < 1e-3 and abs(a[-1]) < 1e-3, "faded in and out: no clicks at the ends"
    other = S.sample_scene(S._sample_rng(0, "val", 4), "val")
    assert not np.array_equal(a, A.render_audio(other))


def test_dominant_frequency_is_the_colours_fundamental():
    for shape in ("circle", "star"):  # a pure sine and the recipe with the strongest harmonics
        peaks = []
        for color, f0 in A.COLOR_FREQS.items():
            x = A.render_audio(_scene(shape, color))
            spectrum = np.abs(np.fft.rfft(x))
            peaks.append(np.argmax(spectrum) * SR / len(x))  # 1 Hz resolution for a 1 s clip
            assert peaks[-1] == pytest.approx(f0, abs=1.0), (shape, color)
        assert len(set(peaks)) == len(A.COLOR_FREQS)


def test_large_is_louder_than_small():
    for shape in S.SHAPES:
        small, large = (A.render_audio(_scene(shape, "green", size)) for size in ("small", "large"))
        assert _rms(large) > 2 * _rms(small), shape
    # Three large objects in one column can sum to 1.8: the clip is scaled down to PEAK_LIMIT, not clipped.
    column = (("circle", "red", "top"), ("square", "cyan", "center"), ("heart", "brown", "bottom"))
    crowded = {"objects": [_scene(shape, color, "large", row)["objects"][0] for shape, color, row in column]}
    peak = np.abs(A.render_audio(crowded)).max()
    assert A.PEAK_LIMIT - 4 * A.NOISE_STD <= peak <= A.PEAK_LIMIT + 4 * A.NOISE_STD


def test_column_sets_the_time_third():
    for position, column in (("left", 0), ("top", 1), ("bottom right", 2), ("center", 1)):
        energy = np.square(A.render_audio(_scene(position=position)), dtype=np.float64)
        thirds = [energy[k * SR // 3 : (k + 1) * SR // 3].sum() for k in range(3)]
        assert thirds[column] > 0.98 * sum(thirds), position


def test_shapes_give_distinct_log_mel_spectrograms():
    log_mel = LogMel()

    def features(scene: dict) -> torch.Tensor:
        return log_mel(load_audio(A.encode_flac(A.render_audio(scene), SR)))  # (64, 101)

    # The log of the noise bed fluctuates by ~0.05 per bin, enough to swamp a sine's two-band footprint in a plain
    # mean: compare only what rises above the noise floor, measured on the silent first third of the clip.
    floor = features(_scene())[:, :30].max()
    for color in ("red", "brown"):  # the lowest pitch (most harmonics) and the highest (fewest)
        mels = {shape: features(_scene(shape, color, "small")).clamp(min=floor) for shape in S.SHAPES}
        for a, b in itertools.combinations(S.SHAPES, 2):
            assert (mels[a] - mels[b]).abs().mean() > 0.004, (color, a, b)
    # The same scene with different noise (any change to the dict reseeds it) is far closer than any shape pair.
    same = features({**_scene(), "tag": 1}).clamp(min=floor), features(_scene()).clamp(min=floor)
    assert (same[0] - same[1]).abs().mean() < 0.001


def test_flac_round_trip_through_load_audio():
    x = A.render_audio(_scene("heart", "pink", position="left"))
    data = A.encode_flac(x, SR)
    assert data[:4] == b"fLaC"
    wave = load_audio(data)  # resampled 8 -> 16 kHz
    assert wave.shape == (16000,) and wave.dtype == torch.float32
    direct = load_audio(data, sample_rate=SR)
    np.testing.assert_allclose(direct.numpy(), x, atol=1 / 32768 + 1e-6)  # 16-bit quantisation only


def test_make_sample_with_audio_keeps_the_other_members():
    for index in range(4):
        plain, with_audio = S.make_sample(index, "val", seed=0), S.make_sample(index, "val", seed=0, audio=True)
        assert set(with_audio) == set(plain) | {"flac"}
        assert all(with_audio[k] == plain[k] for k in plain)
        assert load_audio(with_audio["flac"]).shape == (16000,)


def test_audio_dataset_lives_in_its_own_cached_folder(tmp_path):
    paths = S.ensure_synthetic_dataset(tmp_path, 20, 10, audio=True)
    plain = S.ensure_synthetic_dataset(tmp_path, 20, 10)
    audio_dir, plain_dir = Path(paths["train"]).parent, Path(plain["train"]).parent
    assert audio_dir != plain_dir and audio_dir.name == f"{plain_dir.name}-audio"
    for split, pattern in paths.items():
        shards = [Path(p) for p in braceexpand.braceexpand(pattern)]
        with tarfile.open(shards[0]) as tar:
            names = tar.getnames()
        assert sum(n.endswith(".flac") for n in names) == (20 if split == "train" else 10)
        assert names[:4] == [f"{split}-0000000.{ext}" for ext in ("png", "txt", "json", "flac")]
    with tarfile.open(next(plain_dir.glob("train-*.tar"))) as tar:
        assert not any(n.endswith(".flac") for n in tar.getnames())
    # A cache hit rewrites nothing; the audio manifest records the renderer's version.
    shard = audio_dir / "train-000000.tar"
    before = (shard.stat().st_mtime_ns, shard.stat().st_ino)
    assert S.ensure_synthetic_dataset(tmp_path, 20, 10, audio=True) == paths
    assert (shard.stat().st_mtime_ns, shard.stat().st_ino) == before
    assert '"audio"' in (audio_dir / "train.manifest.json").read_text()
    assert '"audio"' not in (plain_dir / "train.manifest.json").read_text()


def test_parallel_audio_shards_match_serial(tmp_path):
    kw = dict(split="train", n=6, image_size=32, samples_per_shard=3, audio=True)
    serial = S.write_synthetic_shards(tmp_path / "a", processes=1, **kw)
    parallel = S.write_synthetic_shards(tmp_path / "b", processes=2, **kw)
    assert _read_shards(serial) == _read_shards(parallel)
    with tarfile.open(next(iter(braceexpand.braceexpand(parallel)))) as tar:
        assert "train-0000000.flac" in tar.getnames()
