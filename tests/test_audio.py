"""Audio front end: decoding, resampling, crop/pad, log-mel against a numpy reference, SpecAugment."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from mmfusion.config import ConfigError
from mmfusion.data.audio import (
    AudioConfig,
    AudioLoadError,
    AudioTransform,
    LogMel,
    crop_or_pad,
    load_audio,
    mel_filterbank,
    resample,
    spec_augment,
)


def sine(freq: float, rate: int, n: int, amplitude: float = 1.0, phase: float = 0.3) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(n) / rate + phase)


def chirp(rate: int, n: int, f0: float = 50.0, f1: float = 7500.0) -> np.ndarray:
    t = np.arange(n) / rate
    duration = n / rate
    return 0.8 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration)))


# ---- numpy reference for the log-mel front end (written from the documented definition, not the module) ----


def reference_filterbank(cfg: AudioConfig) -> np.ndarray:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    points = mel_to_hz(np.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max), cfg.n_mels + 2))
    bins = np.fft.rfftfreq(cfg.n_fft, d=1.0 / cfg.sample_rate)
    bank = np.zeros((cfg.n_mels, len(bins)))  # (n_mels, F)
    for m in range(cfg.n_mels):
        lo, centre, hi = points[m], points[m + 1], points[m + 2]
        for k, f in enumerate(bins):
            if lo < f <= centre:
                bank[m, k] = (f - lo) / (centre - lo)
            elif centre < f < hi:
                bank[m, k] = (hi - f) / (hi - centre)
        bank[m] *= 2.0 / (hi - lo)
    return bank


def reference_log_mel(x: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    pad = cfg.n_fft // 2
    padded = np.pad(np.asarray(x, dtype=np.float64), pad, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)  # periodic Hann
    n_frames = 1 + (len(padded) - cfg.n_fft) // cfg.hop_length
    frames = np.stack([padded[i * cfg.hop_length : i * cfg.hop_length + cfg.n_fft] for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (frames, F)
    mel = reference_filterbank(cfg) @ power.T  # (n_mels, frames)
    return (np.log10(np.maximum(mel, 1e-10)) + 4.5) / 5.0


CONFIGS = [
    AudioConfig(),
    AudioConfig(n_fft=512, hop_length=128, n_mels=40, f_min=50.0, f_max=7600.0),
    AudioConfig(sample_rate=22050, n_fft=401, hop_length=100, n_mels=48, f_max=11025.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "512-40", "odd-fft-22k"])
@pytest.mark.parametrize("kind", ["noise", "chirp"])
def test_log_mel_matches_numpy_reference(cfg: AudioConfig, kind: str):
    n = int(0.5 * cfg.sample_rate) + 37  # not a multiple of the hop
    rng = np.random.default_rng(0)
    if kind == "noise":
        x = rng.uniform(-0.5, 0.5, n)
    else:  # a touch of noise keeps far-off bands above float32 round-off, where log10 would amplify it
        x = chirp(cfg.sample_rate, n, f1=0.45 * cfg.sample_rate) + 1e-3 * rng.standard_normal(n)
    expected = reference_log_mel(x, cfg)
    module = LogMel(cfg)
    got64 = module(torch.from_numpy(x)).numpy()  # float64 in, float64 computed
    got32 = module(torch.from_numpy(x).float()).numpy()
    assert got64.shape == expected.shape
    assert np.abs(got64 - expected).max() < 1e-6
    assert got32.dtype == np.float32
    assert np.abs(got32 - expected).max() < 1e-3


def test_log_mel_batches_and_fixed_normalisation():
    module = LogMel()
    x = torch.rand(2, 3, 8000) - 0.5
    batched = module(x)
    assert batched.shape == (2, 3, 64, 51)
    # batch-independent: each clip's features are those it gets alone
    torch.testing.assert_close(batched[1, 2], module(x[1, 2]), atol=1e-5, rtol=0)
    silence = module(torch.zeros(4000))
    torch.testing.assert_close(silence, torch.full_like(silence, (-10 + 4.5) / 5))
    with pytest.raises(ValueError, match="samples"):
        module(torch.zeros(100))  # too short for reflect padding


def test_mel_filterbank_htk_centres_and_area_normalisation():
    cfg = AudioConfig()
    bank = mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate, cfg.f_min, cfg.f_max).numpy()
    assert bank.shape == (64, 201) and bank.dtype == np.float32
    assert (bank >= 0).all() and (bank.sum(axis=1) > 0).all()
    np.testing.assert_allclose(bank, reference_filterbank(cfg), rtol=1e-5, atol=1e-9)
    bin_hz = cfg.sample_rate / cfg.n_fft
    # Slaney-style: every triangle has unit area in Hz; a long FFT samples even the narrowest finely enough
    fine = mel_filterbank(4096, 64, 16000, 0.0, 8000.0).numpy()
    np.testing.assert_allclose(fine.sum(axis=1) * 16000 / 4096, 1.0, atol=0.02)
    # HTK: the peak of filter 40 sits at the bin nearest 700 * (10 ** (41 * mel(8000) / 65 / 2595) - 1)
    centre = 700 * (10 ** (41 * 2595 * math.log10(1 + 8000 / 700) / 65 / 2595) - 1)
    assert abs(bank[40].argmax() * bin_hz - centre) <= bin_hz / 2 + 1e-6


# ---- resampling ----


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000)])
def test_resample_sine_matches_analytic(orig: int, new: int):
    x = torch.from_numpy(sine(440.0, orig, orig // 2)).float()  # 0.5 s
    y = resample(x, orig, new)
    assert y.dtype == torch.float32
    assert y.shape[-1] == math.ceil(x.shape[-1] * new / orig)
    expected = sine(440.0, new, y.shape[-1])
    edge = 200  # zero signal is assumed outside the clip, so the ends carry the filter's edge effects
    assert np.abs(y.numpy() - expected)[edge:-edge].max() < 1e-3


def test_resample_antialiases_when_downsampling():
    def gain_db(freq: float, orig: int, new: int) -> float:
        y = resample(torch.from_numpy(sine(freq, orig, orig // 2)), orig, new).numpy()[100:-100]
        return 10 * math.log10(np.mean(y**2) / 0.5)

    assert gain_db(7000.0, 44100, 8000) < -20  # would alias to 1 kHz
    assert gain_db(9000.0, 44100, 16000) < -40  # would alias to 7 kHz
    assert abs(gain_db(3000.0, 44100, 8000)) < 0.1  # the passband survives
    assert abs(gain_db(6000.0, 48000, 16000)) < 0.1


@pytest.mark.parametrize("length", [1, 7, 441, 1000, 4411])
@pytest.mark.parametrize("orig,new", [(44100, 16000), (16000, 44100), (48000, 16000), (8000, 16000), (16000, 16001)])
def test_resample_length_is_ceil(length: int, orig: int, new: int):
    assert resample(torch.zeros(length), orig, new).shape == (math.ceil(length * new / orig),)


def test_resample_identity_and_batches():
    x = torch.randn(2, 3, 2205)
    assert resample(x, 16000, 16000) is x
    y = resample(x, 22050, 16000)
    assert y.shape == (2, 3, 1600)
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 22050, 16000))
    with pytest.raises(ValueError):
        resample(x, 0, 16000)


# ---- decoding ----


@pytest.mark.parametrize(
    "fmt,subtype,tol",
    [("WAV", "PCM_16", 1e-4), ("WAV", "PCM_U8", 1e-2), ("WAV", "PCM_24", 1e-6), ("WAV", "FLOAT", 1e-7),
     ("WAV", "PCM_32", 1e-7), ("FLAC", "PCM_16", 1e-4), ("FLAC", "PCM_24", 1e-6)],
)  # fmt: skip
def test_load_audio_formats(tmp_path, fmt: str, subtype: str, tol: float):
    x = sine(440.0, 16000, 8000, amplitude=0.6)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, x, 16000, format=fmt, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == torch.float32 and y.shape == (8000,)
    assert np.abs(y.numpy() - x).max() < tol
    torch.testing.assert_close(load_audio(path.read_bytes()), y)  # bytes decode the same
    torch.testing.assert_close(load_audio(str(path)), y)


def test_load_audio_averages_channels(tmp_path):
    x = sine(300.0, 16000, 4000, amplitude=0.8)
    sf.write(tmp_path / "cancel.wav", np.stack([x, -x], axis=1), 16000, subtype="FLOAT")
    assert load_audio(tmp_path / "cancel.wav").abs().max() < 1e-6
    sf.write(tmp_path / "left.flac", np.stack([x, np.zeros_like(x)], axis=1), 16000, subtype="PCM_24")
    np.testing.assert_allclose(load_audio(tmp_path / "left.flac").numpy(), x / 2, atol=1e-6)
    six = np.stack([x * (i % 2) for i in range(6)], axis=1)  # 5.1: three of six channels carry x
    sf.write(tmp_path / "six.wav", six, 16000, subtype="PCM_16")
    np.testing.assert_allclose(load_audio(tmp_path / "six.wav").numpy(), x / 2, atol=1e-4)


def test_load_audio_resamples_files(tmp_path):
    sf.write(tmp_path / "cd.wav", sine(440.0, 44100, 22050, amplitude=0.5), 44100, subtype="PCM_16")
    y = load_audio(tmp_path / "cd.wav")
    assert y.shape == (8000,)
    assert np.abs(y.numpy() - sine(440.0, 16000, 8000, amplitude=0.5))[200:-200].max() < 1e-3
    sf.write(tmp_path / "odd.flac", np.zeros(1000), 44100, subtype="PCM_16")
    assert load_audio(tmp_path / "odd.flac").shape == (math.ceil(1000 * 16000 / 44100),)
    assert load_audio(tmp_path / "cd.wav", sample_rate=8000).shape == (4000,)
    with pytest.raises(AudioLoadError, match="44100 Hz"):
        load_audio(tmp_path / "cd.wav", source_rate=16000)


def test_load_audio_arrays_and_tensors():
    x = sine(440.0, 16000, 3000, amplitude=0.5)
    y = load_audio(x)  # float64 array at the default rate
    assert y.dtype == torch.float32 and y.shape == (3000,)
    np.testing.assert_allclose(y.numpy(), x, atol=1e-7)
    stereo = torch.from_numpy(np.stack([x, np.zeros_like(x)])).float()  # (C, T)
    np.testing.assert_allclose(load_audio(stereo).numpy(), x / 2, atol=1e-7)
    assert load_audio(torch.from_numpy(sine(440.0, 48000, 9000)), source_rate=48000).shape == (3000,)
    pcm = (x * 32768).astype(np.int16)  # integer PCM is scaled from its type's range
    np.testing.assert_allclose(load_audio(pcm).numpy(), x, atol=1e-4)
    loud = load_audio(np.array([0.0, 1.5, -2.0, 0.5]))
    assert loud.tolist() == [0.0, 1.0, -1.0, 0.5]  # clipped to [-1, 1]


def test_load_audio_errors_name_the_input(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, sine(440.0, 16000, 1600), 16000, subtype="PCM_16")
    (tmp_path / "truncated.wav").write_bytes(good.read_bytes()[:30])  # cut inside the header
    (tmp_path / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "notes.flac").write_text("this is a text file, not FLAC\n" * 20)
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000, subtype="PCM_16")
    for name in ["truncated.wav", "garbage.wav", "notes.flac", "empty.wav", "missing.wav"]:
        path = tmp_path / name
        with pytest.raises(AudioLoadError, match=re.escape(str(path))):
            load_audio(path)
    with pytest.raises(AudioLoadError, match="bytes"):
        load_audio(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(AudioLoadError, match=r"Tensor of shape \(3,\).*NaN"):
        load_audio(torch.tensor([0.0, float("nan"), 0.1]))
    with pytest.raises(AudioLoadError, match="infinite"):
        load_audio(np.array([[0.0, np.inf]]))
    with pytest.raises(AudioLoadError, match="no samples"):
        load_audio(np.zeros((2, 0), dtype=np.float32))
    with pytest.raises(AudioLoadError, match=r"\(T,\) or \(C, T\)"):
        load_audio(torch.zeros(1, 2, 100))
    assert issubclass(AudioLoadError, ValueError)


# ---- crop/pad, SpecAugment, the transform ----


def test_crop_or_pad():
    x = torch.arange(100.0)
    assert crop_or_pad(x, 100).equal(x)
    padded = crop_or_pad(x, 130)
    assert padded.shape == (130,) and padded[:100].equal(x) and (padded[100:] == 0).all()
    assert crop_or_pad(x, 40).equal(torch.arange(30.0, 70.0))  # centre crop, every time
    assert crop_or_pad(x, 40).equal(crop_or_pad(x, 40))
    crops = [crop_or_pad(x, 40, random.Random(seed)) for seed in range(20)]
    again = [crop_or_pad(x, 40, random.Random(seed)) for seed in range(20)]
    assert all(a.equal(b) for a, b in zip(crops, again, strict=True))
    starts = {int(c[0]) for c in crops}
    assert len(starts) > 5 and all(0 <= s <= 60 for s in starts)
    assert all(c.equal(torch.arange(c[0], c[0] + 40)) for c in crops)  # contiguous slices
    assert crop_or_pad(torch.zeros(2, 50), 80).shape == (2, 80)
    with pytest.raises(ValueError):
        crop_or_pad(x, 0)


def expected_masks(seed: int, n_mels: int, frames: int, **kw: int) -> tuple[set[int], set[int]]:
    """Masked rows and columns, replaying spec_augment's documented draw order."""
    rng = random.Random(seed)
    rows: set[int] = set()
    cols: set[int] = set()
    for count, width, size, out in ((kw["freq_masks"], kw["freq_width"], n_mels, rows),
                                    (kw["time_masks"], kw["time_width"], frames, cols)):  # fmt: skip
        for _ in range(count):
            w = rng.randint(0, min(width, size))
            start = rng.randint(0, size - w)
            out.update(range(start, start + w))
    return rows, cols


def test_spec_augment_masks_and_determinism():
    mel = torch.rand(64, 201, generator=torch.Generator().manual_seed(0)) + 1.0  # no value equals the mean
    before = mel.clone()
    fill = mel.mean()
    kw = {"freq_masks": 2, "freq_width": 8, "time_masks": 3, "time_width": 20}
    total_rows = total_cols = 0
    for seed in range(10):
        out = spec_augment(mel, random.Random(seed), **kw)
        assert out.equal(spec_augment(mel, random.Random(seed), **kw))
        assert mel.equal(before) and out.data_ptr() != mel.data_ptr()
        rows, cols = expected_masks(seed, 64, 201, **kw)
        assert {i for i in range(64) if (out[i] == fill).all()} == rows
        assert {j for j in range(201) if (out[:, j] == fill).all()} == cols
        keep = torch.ones_like(mel, dtype=torch.bool)
        keep[sorted(rows)] = False
        keep[:, sorted(cols)] = False
        assert out[keep].equal(mel[keep]) and (out[~keep] == fill).all()
        assert len(rows) <= 16 and len(cols) <= 60
        total_rows, total_cols = total_rows + len(rows), total_cols + len(cols)
    assert total_rows > 0 and total_cols > 0
    none = {"freq_masks": 0, "freq_width": 8, "time_masks": 0, "time_width": 20}
    assert spec_augment(mel, random.Random(0), **none).equal(mel)


def test_audio_transform_shapes_and_modes():
    cfg = AudioConfig()
    eval_tf, train_tf = AudioTransform(cfg), AudioTransform(cfg, train=True)
    assert eval_tf.num_frames == 201
    odd = AudioConfig(duration=1.0, n_fft=401)
    assert AudioTransform(odd).num_frames == 100 == LogMel(odd)(torch.zeros(16000)).shape[-1]
    short = sine(440.0, 16000, 8000, amplitude=0.5)  # 0.5 s
    long = sine(440.0, 44100, 3 * 44100, amplitude=0.5) * np.linspace(0, 1, 3 * 44100)  # 3 s, fades in
    for tf in (eval_tf, train_tf):
        for clip, rate in ((short, 16000), (long, 44100)):
            out = tf(clip, random.Random(0), source_rate=rate)
            assert out.shape == (cfg.n_mels, tf.num_frames) and out.dtype == torch.float32
    # eval: the deterministic centre crop, no masking
    waveform = load_audio(long, source_rate=44100)
    centre = waveform[(len(waveform) - 32000) // 2 :][:32000]
    torch.testing.assert_close(eval_tf(long, source_rate=44100), LogMel(cfg)(centre))
    torch.testing.assert_close(eval_tf(long, random.Random(5), source_rate=44100), eval_tf(long, source_rate=44100))
    # train: reproducible per rng seed, and different across seeds
    a = train_tf(long, random.Random(3), source_rate=44100)
    assert a.equal(train_tf(long, random.Random(3), source_rate=44100))
    assert not a.equal(train_tf(long, random.Random(4), source_rate=44100))
    with pytest.raises(ValueError, match="rng"):
        train_tf(short)


def test_audio_config_validation():
    assert AudioConfig().num_samples == 32000
    with pytest.raises(ConfigError):
        AudioConfig(f_max=9000.0)
    with pytest.raises(ConfigError):
        AudioConfig(hop_length=0)
