"""Synthetic shapes dataset: the built-in default dataset and the test fixture.

Scenes hold 1-3 flat-coloured shapes (8 shapes x 10 colours x 2 sizes) placed on a 3x3 grid of positions over
low-saturation plain, gradient or lightly noisy backgrounds. Each sample is an antialiased PNG, a short natural
caption and a JSON record of the exact objects, written as webdataset shards in the img2dataset layout
(``<key>.png``, ``<key>.txt``, ``<key>.json``). With ``audio=True`` every sample also carries ``<key>.flac``, a
1 s 8 kHz clip that encodes the same objects (see :mod:`mmfusion.data.synthetic_audio`); the other members keep
exactly the bytes they have without audio.

A fixed set of colour-shape combinations (``HELDOUT_COMBOS``) never appears in training while about 30% of
validation samples contain one, so compositional generalisation can be measured as in CLEVR-CoGenT
(Johnson et al., 2017, "CLEVR: A Diagnostic Dataset for Compositional Language and Elementary Visual Reasoning").
Every sample draws from its own seed (seed, split, index), so shards are byte-identical across runs and can be
generated in parallel, in any order.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import multiprocessing
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmfusion.data.writer import add_sample

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
# Saturated and pairwise far apart (min RGB distance ~90) so the colour name is never ambiguous at 64 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 225, 30),
    "purple": (135, 55, 190),
    "orange": (250, 135, 20),
    "pink": (250, 135, 200),
    "cyan": (40, 215, 225),
    "white": (250, 250, 250),
    "brown": (125, 75, 35),
}
SIZES = ("small", "large")
# (color, shape): one per shape and at most one per colour, so every colour and every shape is still seen in
# training with other partners; 8 of the 80 combinations (10%).
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "star"), ("green", "triangle"), ("orange", "circle"), ("blue", "heart"), ("yellow", "hexagon")}
    | {("red", "diamond"), ("cyan", "square"), ("pink", "cross")}
)
SPLITS = ("train", "val", "test")
RELATIONS = ("above", "below", "left of", "right of")
# Bump whenever generation changes, so cached shards (see the manifest) are rebuilt.
VERSION = 1

N_OBJECTS_P = (0.5, 0.3, 0.2)  # single-object scenes are frequent: later evals probe per-object attributes
EVAL_UNSEEN_P = 0.3  # share of val/test scenes that contain one held-out combination
SIZE_RANGE = {"small": (0.22, 0.28), "large": (0.40, 0.50)}  # side of the shape's box, fraction of image width
CELL_MARGIN = 0.04  # centres stay this far inside their third, so the position word is never borderline
EDGE_PAD = 0.02  # shapes never touch the image border
GAP = 0.03  # minimum free space between two objects' bboxes (2 px at 64)
BG_MIN_DIST = 80.0  # background colours stay this far (RGB L2) from every object colour
SUPERSAMPLE = 4

POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
POSITION_PHRASES = {
    "top left": ("in the top left", "at the top left"),
    "top": ("at the top",),
    "top right": ("in the top right", "at the top right"),
    "left": ("on the left",),
    "center": ("in the center", "in the middle"),
    "right": ("on the right",),
    "bottom left": ("in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right", "at the bottom right"),
}
SHAPE_SYNONYMS = {"circle": ("ball", "disc"), "square": ("box",), "diamond": ("rhombus",), "cross": ("plus sign",)}
SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
RELATION_PHRASES = {
    "above": ("above",),
    "below": ("below", "under"),
    "left of": ("to the left of",),
    "right of": ("to the right of",),
}
BG_WORDS = {"plain": "plain", "gradient": "gradient", "noise": "noisy"}


def _regular(n: int, radius_inner: float | None = None, start_deg: float = -90.0) -> np.ndarray:
    """Vertices of a regular polygon (or a star when ``radius_inner`` is given) around the origin."""
    k = 2 * n if radius_inner is not None else n
    angles = np.deg2rad(start_deg) + 2 * np.pi * np.arange(k) / k
    radii = np.ones(k) if radius_inner is None else np.where(np.arange(k) % 2 == 0, 1.0, radius_inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    return np.stack([x, y], axis=1)


def _cross(arm: float) -> np.ndarray:
    """A plus sign with arms of half-width ``arm``: one quarter of its outline, rotated four times."""
    quarter = np.array([[-arm, -1], [arm, -1], [arm, -arm]])
    rot = np.array([[0, 1], [-1, 0]])  # (x, y) -> (-y, x), a quarter turn
    return np.concatenate([quarter @ np.linalg.matrix_power(rot, k) for k in range(4)])


def _normalise(points: np.ndarray) -> np.ndarray:
    # Centre each template on its tight bbox and scale its longer side to 2, so (cx, cy) is the bbox centre and
    # the object's ``scale`` is exactly the longer side of its bbox.
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) / ((hi - lo).max() / 2)


# Unit polygons in image coordinates (y down), upright: orientation is what tells a square from a diamond.
_TEMPLATES = {
    "circle": _normalise(_regular(64)),
    "square": _normalise(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)),
    "triangle": _normalise(_regular(3)),
    "star": _normalise(_regular(5, radius_inner=0.45)),
    "hexagon": _normalise(_regular(6, start_deg=0.0)),
    "diamond": _normalise(np.array([[0, -1], [0.7, 0], [0, 1], [-0.7, 0]], float)),
    "cross": _normalise(_cross(0.34)),
    "heart": _normalise(_heart()),
}
_EXTENTS = {name: (pts.min(0), pts.max(0)) for name, pts in _TEMPLATES.items()}
_SEEN_COMBOS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_COMBOS)
_HELDOUT = tuple(sorted(HELDOUT_COMBOS))
_PALETTE = np.array(list(COLORS.values()), float)


def _draw_combos(rng: np.random.Generator, split: str, n: int) -> list[tuple[str, str]]:
    """``n`` distinct (color, shape) pairs; eval splits get one held-out pair in ``EVAL_UNSEEN_P`` of scenes."""
    picks = [_SEEN_COMBOS[i] for i in rng.choice(len(_SEEN_COMBOS), size=n, replace=False)]
    if split != "train" and rng.random() < EVAL_UNSEEN_P:
        picks[int(rng.integers(n))] = _HELDOUT[int(rng.integers(len(_HELDOUT)))]
    return picks


def _sample_axis(rng: np.random.Generator, cell: int, half: float) -> float:
    lo = max(cell / 3 + CELL_MARGIN, half + EDGE_PAD)
    hi = min((cell + 1) / 3 - CELL_MARGIN, 1 - half - EDGE_PAD)
    return round(float(rng.uniform(lo, hi)), 4)


def _place(rng: np.random.Generator, combos: list[tuple[str, str]]) -> list[dict] | None:
    """Rejection-sample a size, grid cell and centre per object; ``None`` when the scene does not fit."""
    objects: list[dict] = []
    for color, shape in combos:
        size = SIZES[int(rng.integers(2))]
        for attempt in range(40):
            if attempt == 20:
                size = "small"  # a large shape may not fit beside the others: keep the combo, shrink it
            scale = round(float(rng.uniform(*SIZE_RANGE[size])), 4)
            row, col = int(rng.integers(3)), int(rng.integers(3))
            lo, hi = _EXTENTS[shape]
            cx = _sample_axis(rng, col, scale / 2 * hi[0])
            cy = _sample_axis(rng, row, scale / 2 * hi[1])
            bbox = [round(float(c + scale / 2 * e), 4) for c, e in zip((cx, cy, cx, cy), (*lo, *hi), strict=True)]
            if all(_separation(bbox, o["bbox"]) >= GAP and o["position"] != POSITIONS[row][col] for o in objects):
                break
        else:
            return None
        rgb = list(COLORS[color])
        objects.append(dict(shape=shape, color=color, size=size, rgb=rgb, scale=scale, cx=cx, cy=cy, bbox=bbox))
        objects[-1]["position"] = POSITIONS[row][col]
    return objects


def _separation(a: list[float], b: list[float]) -> float:
    """Free space between two boxes along the axis where they are further apart (negative when they overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _relation(a: dict, b: dict) -> str:
    """Where ``a`` is relative to ``b``, along the axis on which their (disjoint) bboxes are separated most."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
    if max(by0 - ay1, ay0 - by1) > max(bx0 - ax1, ax0 - bx1):
        return "above" if a["cy"] < b["cy"] else "below"
    return "left of" if a["cx"] < b["cx"] else "right of"


def _bg_color(rng: np.random.Generator) -> list[int]:
    for _ in range(1000):
        h, s, v = rng.uniform(0, 1), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.7)
        rgb = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
        if np.linalg.norm(_PALETTE - rgb, axis=1).min() >= BG_MIN_DIST:
            return [int(c) for c in rgb]
    raise RuntimeError("no background colour far enough from the object palette")


def _sample_background(rng: np.random.Generator) -> dict:
    kind = ("plain", "gradient", "noise")[int(rng.integers(3))]
    bg: dict = {"kind": kind, "rgb": _bg_color(rng)}
    if kind == "gradient":
        while True:  # endpoints are safe; also keep every blend between them away from the palette
            rgb2 = _bg_color(rng)
            line = np.linspace(bg["rgb"], rgb2, 9)
            if np.linalg.norm(line[:, None] - _PALETTE[None], axis=2).min() >= BG_MIN_DIST:
                break
        bg.update(rgb2=rgb2, direction=("horizontal", "vertical", "diagonal")[int(rng.integers(3))])
    elif kind == "noise":
        bg.update(noise_seed=int(rng.integers(2**31)), noise_std=round(float(rng.uniform(3.0, 8.0)), 2))
    return bg


def sample_scene(rng: np.random.Generator, split: str) -> dict:
    """Draw a scene: objects (no held-out combo in ``"train"``), their pairwise relations and a background."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    n = int(rng.choice(3, p=N_OBJECTS_P)) + 1
    combos = _draw_combos(rng, split, n)
    objects = None
    while objects is None:  # practically always the first try; small shapes always fit eventually
        objects = _place(rng, combos)
    relations = [
        {"a": i, "relation": _relation(objects[i], objects[j]), "b": j} for i in range(n) for j in range(i + 1, n)
    ]
    return {
        "objects": objects,
        "relations": relations,
        "background": _sample_background(rng),
        "label": objects[0]["shape"],
        "unseen": any((o["color"], o["shape"]) in HELDOUT_COMBOS for o in objects),
        "n_objects": n,
    }


def _render_background(bg: dict, size: int) -> np.ndarray:
    base = np.array(bg["rgb"], float)
    arr = np.broadcast_to(base, (size, size, 3))
    if bg["kind"] == "gradient":
        t = np.linspace(0.0, 1.0, size)
        ramp = {"horizontal": t[None, :], "vertical": t[:, None], "diagonal": (t[None, :] + t[:, None]) / 2}
        arr = arr + (np.array(bg["rgb2"], float) - base) * ramp[bg["direction"]][..., None]
    if bg["kind"] == "noise":
        # Luminance noise seeded from the scene, so rendering is a pure function of the scene dict; clipped at
        # 2 std so no pixel drifts towards an object colour (max shift 16*sqrt(3) < BG_MIN_DIST).
        noise = np.random.default_rng(bg["noise_seed"]).normal(0.0, bg["noise_std"], (size, size, 1))
        arr = arr + np.clip(noise, -2 * bg["noise_std"], 2 * bg["noise_std"])
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def render_scene(scene: dict, image_size: int = 64) -> Image.Image:
    """Render ``scene`` as an RGB image; each shape's coverage is drawn at 4x and box-filtered for antialiasing."""
    image = Image.fromarray(_render_background(scene["background"], image_size), "RGB")
    big = image_size * SUPERSAMPLE
    for obj in scene["objects"]:
        points = _TEMPLATES[obj["shape"]] * (obj["scale"] / 2) + np.array([obj["cx"], obj["cy"]])
        # PIL puts pixel centres on integer coordinates, while our normalised coordinates put them at +0.5.
        points = points * big - 0.5
        mask = Image.new("L", (big, big), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in points.tolist()], fill=255)
        image.paste(tuple(obj["rgb"]), mask=mask.resize((image_size, image_size), Image.Resampling.BOX))
    return image


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun(obj: dict, rng: np.random.Generator, p_size: float) -> str:
    """'a small red circle': the colour always comes right before the shape word, so the caption pins both."""
    shape = obj["shape"]
    if shape in SHAPE_SYNONYMS and rng.random() < 0.25:
        shape = _pick(rng, SHAPE_SYNONYMS[shape])
    words = [obj["color"], shape]
    if rng.random() < p_size:
        words.insert(0, _pick(rng, SIZE_WORDS[obj["size"]]))
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _where(obj: dict, rng: np.random.Generator) -> str:
    return _pick(rng, POSITION_PHRASES[obj["position"]])


def caption_scene(scene: dict, rng: np.random.Generator) -> str:
    """A short caption (well under 32 BPE tokens) naming every object's colour and shape, mostly size and place."""
    objs = [scene["objects"][i] for i in rng.permutation(scene["n_objects"])]  # mention order varies
    if len(objs) == 1:
        a, pos = _noun(objs[0], rng, 0.85), _where(objs[0], rng)
        bg = BG_WORDS[scene["background"]["kind"]]
        templates = (
            f"{a} {pos}",
            f"there is {a} {pos}",
            f"{pos}, {a}",
            f"a picture of {a} {pos}",
            f"{a} {pos} on a {bg} background",
            f"{a} on a {bg} background",
            a,
        )
        return _pick(rng, templates)
    if len(objs) == 2:
        a, b = _noun(objs[0], rng, 0.8), _noun(objs[1], rng, 0.8)
        rel = _pick(rng, RELATION_PHRASES[_relation(objs[0], objs[1])])
        pa, pb = _where(objs[0], rng), _where(objs[1], rng)
        templates = (
            f"{a} {rel} {b}",
            f"there is {a} {rel} {b}",
            f"two shapes: {a} {pa} and {b} {pb}",
            f"{a} {pa} and {b} {pb}",
            f"{a} and {b}",
        )
        return _pick(rng, templates)
    a, b, c = (_noun(o, rng, 0.6) for o in objs)
    rel = _pick(rng, RELATION_PHRASES[_relation(objs[0], objs[1])])
    templates = (
        f"three shapes: {a}, {b} and {c}",
        f"{a}, {b} and {c}",
        f"{a} {rel} {b}, and {c}",
        f"there is {a} {rel} {b}, and {c} {_where(objs[2], rng)}",
    )
    return _pick(rng, templates)


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # crc32 gives a stable id for any split name (unlike hash(), which is salted per process).
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def make_sample(index: int, split: str, seed: int, image_size: int = 64, audio: bool = False) -> dict:
    """One webdataset sample: ``{"__key__", "png", "txt", "json"}``, a pure function of its arguments.

    ``audio=True`` adds ``"flac"``, the scene's sound clip; it draws nothing from the sample's generator, so the
    other members are byte-identical to the sample without audio.
    """
    rng = _sample_rng(seed, split, index)
    scene = sample_scene(rng, split)
    caption = caption_scene(scene, rng)
    buf = io.BytesIO()
    render_scene(scene, image_size).save(buf, format="PNG")
    meta = {**scene, "caption": caption, "split": split, "index": index, "seed": seed, "image_size": image_size}
    sample = {
        "__key__": f"{split}-{index:07d}",
        "png": buf.getvalue(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if audio:
        # Imported here: synthetic_audio imports this module's constants, and image-only runs need no soundfile.
        from mmfusion.data.synthetic_audio import SAMPLE_RATE, encode_flac, render_audio

        sample["flac"] = encode_flac(render_audio(scene), SAMPLE_RATE)
    return sample


def _atomic_write_shard(job: tuple[str, int, int, str, int, int, bool]) -> str:
    path, start, stop, split, seed, image_size, audio = job
    # The pid keeps concurrent writers (e.g. several ranks) apart; os.replace makes the shard appear whole.
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, stop):
            add_sample(tar, make_sample(index, split, seed, image_size, audio))
    os.replace(tmp, path)
    return path


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    split: str,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    processes: int | None = None,
    audio: bool = False,
) -> str:
    """Write ``n`` samples as ``out_dir/{split}-000000.tar ...`` and return their brace pattern.

    Work is skipped when ``out_dir/{split}.manifest.json`` matches the request and every shard exists. By default
    two worker processes are used above 2000 samples; the bytes do not depend on ``processes``. ``audio=True``
    adds a ``.flac`` member to every sample (see :func:`make_sample`).
    """
    if n < 1 or samples_per_shard < 1:
        raise ValueError(f"need n >= 1 and samples_per_shard >= 1, got {n} and {samples_per_shard}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / samples_per_shard)
    names = [f"{split}-{i:06d}.tar" for i in range(n_shards)]
    pattern = str(out / f"{split}-{{{0:06d}..{n_shards - 1:06d}}}.tar")
    manifest = {"version": VERSION, "split": split, "n": n, "seed": seed, "image_size": image_size}
    manifest.update(samples_per_shard=samples_per_shard, shards=names)
    if audio:
        # Only audio manifests carry this key, so image-only manifests (and their caches) stay as they were, while
        # a change to the audio renderer (AUDIO_VERSION) rebuilds audio shards alone.
        from mmfusion.data.synthetic_audio import AUDIO_VERSION, DURATION, SAMPLE_RATE

        manifest["audio"] = {"version": AUDIO_VERSION, "sample_rate": SAMPLE_RATE, "duration": DURATION}
    manifest_path = out / f"{split}.manifest.json"
    if manifest_path.is_file() and all((out / name).is_file() for name in names):
        try:
            if json.loads(manifest_path.read_text()) == manifest:
                return pattern
        except (OSError, ValueError):
            pass  # unreadable manifest: rebuild
    # Drop the manifest first so an interrupted rebuild is never mistaken for a finished one.
    manifest_path.unlink(missing_ok=True)
    for stale in out.glob(f"{split}-*.tar"):  # left over from a larger earlier run; would pollute globs
        if stale.name not in names:
            stale.unlink()
    jobs = [
        (str(out / name), i * samples_per_shard, min(n, (i + 1) * samples_per_shard), split, seed, image_size, audio)
        for i, name in enumerate(names)
    ]
    processes = processes if processes is not None else (2 if n > 2000 else 1)
    if processes > 1 and len(jobs) > 1:
        # fork where we can: a spawned worker re-imports the whole mmfusion package (torch included, seconds per
        # worker). Workers only touch numpy, PIL, soundfile and tarfile, never torch, so threads held by the caller
        # are safe.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(min(processes, len(jobs))) as pool:
            for _ in pool.imap_unordered(_atomic_write_shard, jobs):
                pass
    else:
        for job in jobs:
            _atomic_write_shard(job)
    tmp = manifest_path.with_name(f"{manifest_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, manifest_path)
    return pattern


def ensure_synthetic_dataset(
    root: str | os.PathLike, n_train: int, n_val: int, seed: int = 0, image_size: int = 64, audio: bool = False
) -> dict[str, str]:
    """Build (or reuse) train and val shards under ``root/seed{seed}-px{image_size}-n{n_train}-{n_val}``.

    With ``audio=True`` the folder name ends in ``-audio``: image-only and audio shards never share a folder, so
    neither variant's cache ever rebuilds or serves the other.
    """
    out = Path(root) / f"seed{seed}-px{image_size}-n{n_train}-{n_val}{'-audio' if audio else ''}"
    kw = {"seed": seed, "image_size": image_size, "audio": audio}
    return {
        "train": write_synthetic_shards(out, "train", n_train, **kw),
        "val": write_synthetic_shards(out, "val", n_val, **kw),
    }
