"""Audio decoding and the log-mel front end.

:func:`load_audio` turns a WAV/FLAC file (any bit depth, rate and channel count), raw file bytes or an
in-memory waveform into one kind of input: a mono float32 waveform in [-1, 1] at 16 kHz. Files are decoded
by ``soundfile`` (libsndfile); resampling is our own band-limited polyphase filter so no torchaudio is needed.

Feature choices are fixed because a trained model depends on them: the HTK mel scale with Slaney-style area
normalisation (:func:`mel_filterbank`), then ``log10`` and the fixed affine map ``(x + 4.5) / 5``
(:class:`LogMel`), which takes the 1e-10 floor to -1.1 and full-scale uniform white noise to about 0.9 and, unlike
batch statistics, never depends on what else is in the batch.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from mmfusion.config import ConfigError

SAMPLE_RATE = 16000
LOG_FLOOR = 1e-10
LOG_OFFSET = 4.5  # features = (log10(mel) + LOG_OFFSET) / LOG_SCALE
LOG_SCALE = 5.0

# Resampler design: the cutoff sits at ROLLOFF x the lower Nyquist, and the Kaiser window's transition band
# (about 8% of the cutoff with these settings) then ends just below that Nyquist, so downsampling does not
# alias while the passband stays flat to ~0.85 x Nyquist. Beta 8 gives roughly 80 dB of stopband attenuation.
_ROLLOFF = 0.92
_ZERO_CROSSINGS = 32  # sinc zero crossings on each side of the centre tap
_KAISER_BETA = 8.0

AudioSource = str | Path | bytes | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class AudioConfig:
    """Audio front-end settings; the defaults give 25 ms windows, 10 ms hops and 64 mel bands at 16 kHz."""

    sample_rate: int = SAMPLE_RATE
    duration: float = 2.0  # seconds; clips are cropped/padded to exactly this
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0

    def __post_init__(self):
        if min(self.sample_rate, self.duration, self.n_fft, self.hop_length, self.n_mels) <= 0:
            raise ConfigError("audio sample_rate, duration, n_fft, hop_length and n_mels must be positive")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ConfigError(f"audio needs 0 <= f_min < f_max <= sample_rate / 2, got {self.f_min}, {self.f_max}")

    @property
    def num_samples(self) -> int:
        """Samples per clip after crop/pad."""
        return round(self.duration * self.sample_rate)


class AudioLoadError(ValueError):
    """Audio that cannot be decoded, has no samples, or contains NaN/inf; the message names the input."""


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE, source_rate: int | None = None) -> torch.Tensor:
    """Decode ``source`` into a mono float32 waveform (T,) in [-1, 1] at ``sample_rate``.

    Paths and bytes are WAV or FLAC read with soundfile (any bit depth, rate or channel count); their header
    gives the rate, and a ``source_rate`` that disagrees with it is an error. Tensors and arrays are (T,) or
    (C, T) waveforms at ``source_rate`` (``sample_rate`` when None); float data is taken as is, integer data
    is scaled from its type's range. Channels are averaged, and samples outside [-1, 1] are clipped (what
    playback does). Raises :class:`AudioLoadError` for unreadable, empty or non-finite audio.
    """
    if isinstance(source, (str, Path, bytes, bytearray, memoryview)):
        name, waveform, file_rate = _read_file(source)  # (C, T)
        if source_rate is not None and source_rate != file_rate:
            raise AudioLoadError(f"audio {name} is {file_rate} Hz but source_rate={source_rate} was given")
        source_rate = file_rate
    else:
        name = f"{type(source).__name__} of shape {tuple(source.shape)}"
        waveform = _to_float(torch.as_tensor(source))
        if waveform.dim() not in (1, 2):
            raise AudioLoadError(f"audio {name} must be (T,) or (C, T)")
        waveform = waveform if waveform.dim() == 2 else waveform[None]  # (C, T)
        source_rate = sample_rate if source_rate is None else source_rate
    if waveform.numel() == 0:
        raise AudioLoadError(f"audio {name} has no samples")
    if not torch.isfinite(waveform).all():
        raise AudioLoadError(f"audio {name} contains NaN or infinite samples")
    mono = waveform.to(torch.float32).mean(dim=0)  # (T,)
    # Clip last: the band-limited filter can overshoot a full-scale input slightly.
    return resample(mono, source_rate, sample_rate).clamp_(-1.0, 1.0)


def _read_file(source: str | Path | bytes | bytearray | memoryview) -> tuple[str, torch.Tensor, int]:
    if isinstance(source, (str, Path)):
        name, handle = f"file '{source}'", source
    else:
        name, handle = f"bytes ({len(source)} bytes)", io.BytesIO(bytes(source))
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as err:
        raise AudioLoadError(f"cannot decode audio {name}: {err}") from err
    return name, torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def _to_float(waveform: torch.Tensor) -> torch.Tensor:
    if waveform.is_floating_point():
        return waveform
    if waveform.dtype == torch.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (waveform.to(torch.float32) - 128.0) / 128.0
    if waveform.dtype in (torch.int16, torch.int32):
        return waveform.to(torch.float64) / float(-torch.iinfo(waveform.dtype).min)
    raise AudioLoadError(f"audio samples of dtype {waveform.dtype} are not supported")


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling of (..., T) from ``orig_rate`` to ``new_rate`` Hz, returned as (..., T').

    A Kaiser-windowed sinc low-pass, cut off at 0.92 x the lower of the two Nyquist frequencies, is tabulated
    once per output phase (``new / gcd`` phases, stepping ``orig / gcd`` input samples per cycle), and each
    phase is normalised to unit DC gain. The signal is taken as zero outside [0, T), so outputs within the
    filter's half-width (``32 / (0.92 * min(orig, new))`` s, 2.2 ms at 16 kHz) of either end show edge effects.
    Output n sits at input time ``n * orig / new`` and every instant inside the input is produced, so
    ``T' = ceil(T * new / orig)``. Equal rates return ``waveform`` itself.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return waveform
    gcd = math.gcd(orig_rate, new_rate)
    up, down = new_rate // gcd, orig_rate // gcd
    table, half = _phase_filters(up, down, waveform.dtype)  # (up, K)
    length = waveform.shape[-1]
    n_out = -(-length * up // down)  # ceil
    # Output n = q * up + p sits at input time q * down + p * down / up, and its window starts phase_start[p]
    # samples after q * down. Shifting each phase's taps right by phase_start gives all phases one stride-`down`
    # convolution: (B, up, Q) outputs, interleaved afterwards.
    phase_start = [p * down // up for p in range(up)]
    kernel = waveform.new_zeros(up, 1, table.shape[1] + max(phase_start))  # (up, 1, K')
    for p, shift in enumerate(phase_start):
        kernel[p, 0, shift : shift + table.shape[1]] = table[p]
    steps = -(-n_out // up)  # Q
    needed = (steps - 1) * down + kernel.shape[-1]
    flat = waveform.reshape(-1, 1, length)
    flat = torch.nn.functional.pad(flat, (half, max(0, needed - length - half)))  # (B, 1, L)
    phases = torch.nn.functional.conv1d(flat, kernel, stride=down)[..., :steps]  # (B, up, Q)
    out = phases.transpose(1, 2).reshape(flat.shape[0], -1)[:, :n_out]  # (B, T')
    return out.reshape(*waveform.shape[:-1], n_out)


def _phase_filters(up: int, down: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(up, K) filter taps, row p for output phase p, and the half-width in input samples."""
    cutoff = 0.5 * _ROLLOFF * min(1.0, up / down)  # cycles per input sample
    width = _ZERO_CROSSINGS / (2 * cutoff)  # window half-length in input samples
    half = math.ceil(width)
    # Tap j of phase p reads input sample start_p + j - half, which lies (frac_p - j + half) samples before the
    # output instant; frac_p is that instant's offset past start_p.
    frac = (torch.arange(up, dtype=torch.float64) * down % up) / up  # (up,)
    offsets = frac[:, None] - torch.arange(2 * half + 2, dtype=torch.float64) + half  # (up, K)
    # Kaiser window left unscaled by I0(beta): each row is normalised to unit DC gain anyway
    window = torch.special.i0(_KAISER_BETA * torch.sqrt((1 - (offsets / width) ** 2).clamp(min=0)))
    taps = 2 * cutoff * torch.sinc(2 * cutoff * offsets) * window * (offsets.abs() <= width)
    return (taps / taps.sum(dim=1, keepdim=True)).to(dtype), half


def crop_or_pad(waveform: torch.Tensor, num_samples: int, rng: random.Random | None = None) -> torch.Tensor:
    """Crop or zero-pad (..., T) to (..., num_samples).

    Longer clips get a random crop drawn from ``rng``, or the centre crop when ``rng`` is None (deterministic
    eval); the crop is a view. Shorter clips are zero-padded at the end, so the content starts at time 0.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    length = waveform.shape[-1]
    if length > num_samples:
        start = rng.randint(0, length - num_samples) if rng is not None else (length - num_samples) // 2
        return waveform[..., start : start + num_samples]
    return torch.nn.functional.pad(waveform, (0, num_samples - length))


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, evenly spaced on the HTK mel scale ``2595 * log10(1 + f / 700)``.

    Each triangle rises from its lower neighbour's centre to its own and falls to its upper neighbour's, and is
    scaled by ``2 / (f_hi - f_lo)`` (Slaney-style area normalisation) so wide high bands are not louder.
    Computed in float64, returned as ``dtype``. Warns when a band covers no FFT bin (too many mels for n_fft).
    """
    mel_lo, mel_hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    mels = torch.linspace(mel_lo, mel_hi, n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # (n_mels + 2,) Hz
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft  # (F,) rfft bin centres
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    bank = torch.minimum(rising, falling).clamp(min=0) * (2.0 / (upper - lower))  # (n_mels, F)
    if (bank.sum(dim=1) == 0).any():
        warnings.warn(f"{n_mels} mel bands over n_fft={n_fft} leave some bands empty", stacklevel=2)
    return bank.to(dtype)


class LogMel(torch.nn.Module):
    """Waveform (..., T) -> normalised log-mel spectrogram (..., n_mels, 1 + T // hop_length) for even n_fft.

    ``torch.stft`` with a periodic Hann window of ``n_fft`` samples, ``center=True`` with reflect padding,
    power spectrum, the :func:`mel_filterbank`, then ``(log10(max(x, 1e-10)) + 4.5) / 5``: a fixed affine map,
    so the features of a clip never depend on its batch. Computes in the input's float dtype.
    """

    def __init__(self, cfg: AudioConfig | None = None):
        super().__init__()
        self.cfg = c = cfg or AudioConfig()
        # float64, cast per call: float64 input gets float64 features. Not persistent: derived from the config.
        self.register_buffer("window", torch.hann_window(c.n_fft, periodic=True, dtype=torch.float64), persistent=False)
        bank = mel_filterbank(c.n_fft, c.n_mels, c.sample_rate, c.f_min, c.f_max, torch.float64)
        self.register_buffer("filterbank", bank, persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if not waveform.is_floating_point():
            waveform = waveform.to(torch.float32)
        length = waveform.shape[-1]
        if length <= c.n_fft // 2:  # reflect padding needs more samples than it pads
            raise ValueError(f"LogMel needs more than {c.n_fft // 2} samples, got {length}")
        flat = waveform.reshape(-1, length)  # (B, T)
        window = self.window.to(waveform.dtype)
        stft_args = {"hop_length": c.hop_length, "center": True, "pad_mode": "reflect", "return_complex": True}
        spec = torch.stft(flat, c.n_fft, window=window, **stft_args)  # (B, F, frames)
        power = spec.real.square() + spec.imag.square()
        mel = self.filterbank.to(waveform.dtype) @ power  # (B, n_mels, frames)
        features = (mel.clamp(min=LOG_FLOOR).log10() + LOG_OFFSET) / LOG_SCALE
        return features.reshape(*waveform.shape[:-1], c.n_mels, features.shape[-1])


def spec_augment(
    mel: torch.Tensor,
    rng: random.Random,
    freq_masks: int = 2,
    freq_width: int = 8,
    time_masks: int = 2,
    time_width: int = 20,
) -> torch.Tensor:
    """SpecAugment (Park et al., 2019) frequency and time masking, no time warping, on (n_mels, frames).

    Masked bins are set to the input's mean, and a new tensor is returned. Draw order (the result is a pure
    function of ``rng``'s state): for each frequency mask ``width = rng.randint(0, min(freq_width, n_mels))``
    then ``start = rng.randint(0, n_mels - width)``; then the same for each time mask over frames. A width
    may be 0 and masks may overlap, as in the paper.
    """
    if mel.dim() != 2:
        raise ValueError(f"spec_augment expects (n_mels, frames), got shape {tuple(mel.shape)}")
    out, fill = mel.clone(), mel.mean()
    for count, max_width, dim in ((freq_masks, freq_width, 0), (time_masks, time_width, 1)):
        size = mel.shape[dim]
        for _ in range(count):
            width = rng.randint(0, min(max_width, size))
            start = rng.randint(0, size - width)
            out.narrow(dim, start, width).fill_(fill)
    return out


class AudioTransform:
    """Callable: audio source -> (n_mels, num_frames) log-mel features of one clip.

    ``load_audio`` -> ``crop_or_pad`` to ``cfg.duration`` -> :class:`LogMel`. With ``train=True`` the crop is
    random and :func:`spec_augment` is applied, both drawn from the ``rng`` passed per call (required, as for
    the image transform, so a resumed run replays the same augmentation); otherwise the crop is centred and
    nothing is masked.
    """

    def __init__(self, cfg: AudioConfig, train: bool = False):
        self.cfg = cfg
        self.train = train
        self.log_mel = LogMel(cfg)

    @property
    def num_frames(self) -> int:
        """Frames per clip, fixed by the config as every clip has the same length (odd n_fft pads 1 short)."""
        return 1 + (self.cfg.num_samples - self.cfg.n_fft % 2) // self.cfg.hop_length

    def __call__(
        self, source: AudioSource, rng: random.Random | None = None, source_rate: int | None = None
    ) -> torch.Tensor:
        """Features (n_mels, num_frames) of one clip; ``source_rate`` as in :func:`load_audio`."""
        if self.train and rng is None:
            raise ValueError("the train transform needs an explicit rng for reproducible augmentation")
        waveform = load_audio(source, self.cfg.sample_rate, source_rate)  # (T,)
        waveform = crop_or_pad(waveform, self.cfg.num_samples, rng if self.train else None)  # (S,)
        with torch.no_grad():
            features = self.log_mel(waveform)  # (n_mels, frames)
        return spec_augment(features, rng) if self.train else features


def audio_transform_for(cfg, train: bool = False) -> AudioTransform:
    """The front end a model's audio tower expects (``cfg``: :class:`mmfusion.config.AudioTowerConfig`)."""
    return AudioTransform(AudioConfig(duration=cfg.duration, n_mels=cfg.n_mels), train=train)
