"""Sound clips for synthetic scenes: every object of a scene becomes a tone that encodes its attributes.

The clip is a pure function of the scene dict, so audio<->image and audio<->text retrieval on the synthetic
dataset have a learnable ground truth. Each attribute maps to something a log-mel front end (64 mels up to
8 kHz at 16 kHz, 10 ms hop; see :mod:`mmfusion.data.audio`) resolves clearly:

=========  ===================================================================================================
attribute  sound
=========  ===================================================================================================
colour     fundamental frequency (``COLOR_FREQS``), evenly spaced on the mel scale from 160 to 1100 Hz, about
           2.1 mel bands apart: red 160, green 234, blue 313, yellow 400, purple 494, orange 596, pink 707,
           cyan 828, white 958, brown 1100 Hz; the fundamental is always the strongest partial
shape      harmonic recipe x amplitude rhythm (``SHAPE_TIMBRES``), every pair differing in at least one:
           circle = sine, steady; square = odd, steady; triangle = saw, 3 pulses; star = bright, 4 pulses;
           hexagon = odd, 1 pulse; diamond = sine, 4 pulses; cross = bright, 1 pulse; heart = saw, 2 pulses
           (``HARMONIC_RECIPES``: sine = fundamental only; odd = odd harmonics at 1/n; saw = all harmonics
           at 1/n; bright = all harmonics at 1/sqrt(n)). The two all-harmonic recipes, the closest pair at high
           pitch where few harmonics fit, never share a rhythm.
size       peak level (``SIZE_LEVELS``): large 0.6, small 0.25 (7.6 dB apart)
position   time: the column picks the third of the clip the object sounds in (left first, right last);
           the row is not encoded, so objects in one column overlap and are mixed
=========  ===================================================================================================

Every partial stays below ``MAX_PARTIAL_HZ`` (3.4 kHz), so the default 8 kHz clips are alias-free and all
content survives resampling to 16 kHz, whose low-pass is flat only up to about 3.4 kHz. Sounding stretches start
and end with 5 ms raised-cosine fades (no clicks) and leave 20 ms of silence at the edges of each third, so
neighbouring columns do not smear together.

Mixing: objects are summed, and only when the sum's peak exceeds ``PEAK_LIMIT`` (possible only with two or
three objects in one column) is the whole clip scaled by one gain. A single gain keeps every loudness ratio
inside the clip exact, and as the worst case (three large objects in one column, a sum of 1.8) still leaves a
large object at 0.6 x 0.95 / 1.8 = 0.32, a large object is louder than any small one in any clip. Low,
deterministic Gaussian noise (``NOISE_STD``, seeded from the scene) is added after mixing, so its level is the
same in every clip.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable

import numpy as np
import soundfile as sf

from mmfusion.data.synthetic import POSITIONS

SAMPLE_RATE = 8000  # what the shards store; the audio front end resamples to 16 kHz
DURATION = 1.0  # seconds
# Bump whenever the rendering changes, so cached audio shards (see the synthetic manifest) are rebuilt.
AUDIO_VERSION = 1

# Mel-spaced (HTK) from 160 to 1100 Hz and rounded to whole Hz: about 92 mel, i.e. 2.1 of the 64 log-mel bands,
# between neighbours. The top stays at 1100 Hz so even the highest pitch keeps three harmonics below
# MAX_PARTIAL_HZ, which the harmonic recipes need to stay apart.
COLOR_FREQS: dict[str, float] = {
    "red": 160.0,
    "green": 234.0,
    "blue": 313.0,
    "yellow": 400.0,
    "purple": 494.0,
    "orange": 596.0,
    "pink": 707.0,
    "cyan": 828.0,
    "white": 958.0,
    "brown": 1100.0,
}
# Amplitude of harmonic n (1 = the fundamental). The fundamental is always the strongest partial, so the pitch,
# and with it the colour, is where the spectrum peaks.
HARMONIC_RECIPES: dict[str, Callable[[int], float]] = {
    "sine": lambda n: 1.0 if n == 1 else 0.0,
    "odd": lambda n: 1.0 / n if n % 2 else 0.0,
    "saw": lambda n: 1.0 / n,
    "bright": lambda n: n**-0.5,
}
# shape -> (harmonic recipe, pulses per third; 0 = one steady tone).
SHAPE_TIMBRES: dict[str, tuple[str, int]] = {
    "circle": ("sine", 0),
    "square": ("odd", 0),
    "triangle": ("saw", 3),
    "star": ("bright", 4),
    "hexagon": ("odd", 1),
    "diamond": ("sine", 4),
    "cross": ("bright", 1),
    "heart": ("saw", 2),
}
SIZE_LEVELS: dict[str, float] = {"small": 0.25, "large": 0.6}

# The 8 -> 16 kHz resampler (mmfusion.data.audio) is flat only to about 0.85 x 4 kHz and cuts off by 3.68 kHz:
# partials above 3.4 kHz would be attenuated or lost after loading.
MAX_PARTIAL_HZ = 3400.0
PEAK_LIMIT = 0.95  # the mix is scaled down to this peak; noise (at most 3 x NOISE_STD) stays under 1.0 on top
NOISE_STD = 0.003  # about -50 dBFS, roughly 35 dB under a small steady sine
FADE = 0.005  # seconds of raised-cosine fade at each end of a sounding stretch
SLOT_GAP = 0.02  # seconds of silence at each edge of a column's third
PULSE_DUTY = 0.6  # share of each pulse period that sounds

_COLUMN = {name: col for row in POSITIONS for col, name in enumerate(row)}


def _partials(recipe: str, f0: float, sample_rate: int) -> list[tuple[float, float]]:
    """(frequency, amplitude) of every non-zero harmonic below ``MAX_PARTIAL_HZ`` and well below Nyquist."""
    limit = min(MAX_PARTIAL_HZ, 0.45 * sample_rate)
    amplitude = HARMONIC_RECIPES[recipe]
    return [(n * f0, amplitude(n)) for n in range(1, int(limit // f0) + 1) if n * f0 < limit and amplitude(n) > 0]


def _segments(column: int, pulses: int, duration: float) -> list[tuple[float, float]]:
    """(start, end) seconds of each sounding stretch of an object in ``column`` with ``pulses`` pulses."""
    start = column * duration / 3 + SLOT_GAP
    end = (column + 1) * duration / 3 - SLOT_GAP
    if pulses == 0:
        return [(start, end)]
    period = (end - start) / pulses
    return [(start + k * period, start + k * period + PULSE_DUTY * period) for k in range(pulses)]


def _envelope(segments: list[tuple[float, float]], n_samples: int, sample_rate: int) -> np.ndarray:
    """Gain per sample: 1 inside each segment, with raised-cosine fades inside its ends, 0 elsewhere."""
    env = np.zeros(n_samples)
    t = np.arange(n_samples) / sample_rate
    for start, end in segments:
        fade = min(FADE, (end - start) / 2)
        rise = np.clip((t - start) / fade, 0.0, 1.0)
        fall = np.clip((end - t) / fade, 0.0, 1.0)
        env = np.maximum(env, 0.5 - 0.5 * np.cos(np.pi * np.minimum(rise, fall)))
    return env


def _object_tone(obj: dict, n_samples: int, sample_rate: int, duration: float) -> np.ndarray:
    """One object's sound: its harmonic recipe at its colour's pitch, peak-normalised to its size's level."""
    recipe, pulses = SHAPE_TIMBRES[obj["shape"]]
    t = np.arange(n_samples) / sample_rate
    tone = sum(a * np.sin(2 * np.pi * f * t) for f, a in _partials(recipe, COLOR_FREQS[obj["color"]], sample_rate))
    # Normalising the steady tone (not the enveloped one) makes ``SIZE_LEVELS`` the peak of every recipe alike.
    tone = tone / np.abs(tone).max()
    env = _envelope(_segments(_COLUMN[obj["position"]], pulses, duration), n_samples, sample_rate)
    return SIZE_LEVELS[obj["size"]] * env * tone


def _scene_seed(scene: dict) -> int:
    # crc32 of the canonical JSON: stable across processes and runs (hash() is salted per process).
    return zlib.crc32(json.dumps(scene, sort_keys=True, default=str).encode("utf-8"))


def render_audio(scene: dict, sample_rate: int = SAMPLE_RATE, duration: float = DURATION) -> np.ndarray:
    """A mono float32 clip in [-1, 1] of ``duration`` seconds that encodes ``scene``'s objects (module docstring).

    Uses each object's ``shape``, ``color``, ``size`` and ``position``; the noise is seeded from the whole
    scene dict, so the result is a pure function of its arguments.
    """
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    if 0.45 * sample_rate <= max(COLOR_FREQS.values()):
        raise ValueError(f"sample_rate {sample_rate} Hz is too low for fundamentals up to {max(COLOR_FREQS.values())}")
    n_samples = round(sample_rate * duration)
    mix = np.zeros(n_samples)
    for obj in scene["objects"]:
        mix += _object_tone(obj, n_samples, sample_rate, duration)
    peak = np.abs(mix).max()
    if peak > PEAK_LIMIT:  # one gain for the whole clip keeps loudness ratios between objects exact
        mix *= PEAK_LIMIT / peak
    noise = np.random.default_rng(_scene_seed(scene)).normal(0.0, NOISE_STD, n_samples)
    mix += np.clip(noise, -3 * NOISE_STD, 3 * NOISE_STD)
    # The noise bed would otherwise start and stop abruptly: fade the whole clip in and out as well.
    mix *= _envelope([(0.0, n_samples / sample_rate)], n_samples, sample_rate)
    return np.clip(mix, -1.0, 1.0).astype(np.float32)


def encode_flac(waveform: np.ndarray, sample_rate: int) -> bytes:
    """16-bit FLAC file bytes of a mono float waveform in [-1, 1] (values outside are clipped)."""
    buf = io.BytesIO()
    sf.write(
        buf, np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16"
    )
    return buf.getvalue()


def column_of(position: str) -> int:
    """The grid column (0 left, 1 center, 2 right) of a position name such as ``"top left"``."""
    return _COLUMN[position]
