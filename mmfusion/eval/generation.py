"""Text-to-image evaluation on the synthetic shapes dataset, measured from pixels, never with the generator itself.

Images are scored against their prompts (captions such as "a small red star in the top left"). On single-object
prompts, colour and position come from palette-coloured regions (:func:`detect_objects`) and shape from a small CNN
trained on *train*-split renders only (:class:`ShapeClassifier`); :func:`clip_r_precision` uses a contrastive
model's embeddings. :func:`generation_metrics` reports all, also split into ``seen/`` and ``unseen/`` combinations.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from mmfusion.data.synthetic import COLORS, HELDOUT_COMBOS, POSITIONS, SHAPES, make_sample, render_scene, sample_scene
from mmfusion.eval.caption import parse_mentions

ImageLike = Image.Image | np.ndarray
Images = Sequence[ImageLike]
IMAGE_SIZE = 64
# Nearest-palette matching radius (RGB L2). Under half the smallest palette distance (yellow-orange, 90.7), so a
# matched pixel is never ambiguous; under the background margin (80) minus the largest shift of noisy backgrounds
# (2 std of 8 per channel: 27.7), so no background pixel ever matches. Leaves ~45 for blur and colour drift.
MATCH_DIST = 45.0
# Smallest object: 16 px at 64x64. True objects cover >= ~64 px; antialiased render edges leave specks of <= 1 px.
MIN_FRACTION = 16 / 64**2
_PALETTE = np.array(list(COLORS.values()), np.float32)


def _as_rgb(image: ImageLike) -> np.ndarray:
    """``image`` as an (H, W, 3) float32 array on the 0..255 scale (float arrays in [0, 1] are scaled up)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    scale = 255.0 if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0 else 1.0
    return arr[..., :3].astype(np.float32) * scale


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of ``mask`` (each its smallest flat index); ``mask.size`` off the mask."""
    # Min-label propagation, in plain numpy (scipy is no dependency): one step per pixel of component diameter.
    h, w = mask.shape
    labels = np.where(mask, np.arange(h * w).reshape(h, w), h * w)
    while True:
        padded = np.pad(labels, 1, constant_values=h * w)
        nearby = np.min([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 0)
        nearby = np.where(mask, nearby, h * w)
        if np.array_equal(nearby, labels):
            return labels
        labels = nearby


def detect_objects(image: ImageLike, max_dist: float = MATCH_DIST, min_fraction: float = MIN_FRACTION) -> list[dict]:
    """Palette-coloured objects of ``image``, largest first.

    Every pixel within ``max_dist`` (RGB L2) of its nearest ``COLORS`` entry takes that colour; each 8-connected
    region of one colour with at least ``min_fraction`` of the pixels is an object ``{"color", "pixels", "cx", "cy",
    "position", "bbox"}``: centroid and ``[x0, y0, x1, y1]`` box normalised like the scene JSON. ``position`` is the
    3x3 cell of the box centre, as the dataset places it (a large triangle's centroid can lie in the next cell).
    """
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE, axis=-1)
    nearest, matched = dist.argmin(-1), dist.min(-1) <= max_dist
    objects = []
    for k in np.unique(nearest[matched]):
        labels = _components(matched & (nearest == k))
        ids, counts = np.unique(labels[labels < h * w], return_counts=True)
        for label in ids[counts >= max(1.0, min_fraction * h * w)]:
            ys, xs = np.nonzero(labels == label)
            bbox = [float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h)]
            cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
            cell = POSITIONS[min(int(cy * 3), 2)][min(int(cx * 3), 2)]
            centroid = {"cx": float((xs.mean() + 0.5) / w), "cy": float((ys.mean() + 0.5) / h)}
            objects.append({"color": list(COLORS)[k], "pixels": len(xs), **centroid, "position": cell, "bbox": bbox})
    return sorted(objects, key=lambda o: -o["pixels"])


def prompt_objects(prompt: str) -> list[dict]:
    """Objects a prompt asks for, ``[{"color", "shape", "size", "position"}]`` (``None`` where it does not say)."""
    return parse_mentions(prompt)


def _single(prompt: str) -> dict | None:
    """The one object of a single-object prompt; ``None`` for any other prompt (several objects, or none parsed)."""
    mentions = prompt_objects(prompt)
    return mentions[0] if len(mentions) == 1 else None


def _rate(checks: Sequence[bool | None], name: str) -> dict[str, float]:
    """``{name}_acc``: percent of the non-``None`` checks passing (left out when there are none); ``{name}_n``."""
    done = [c for c in checks if c is not None]
    return {**({f"{name}_acc": 100.0 * sum(done) / len(done)} if done else {}), f"{name}_n": float(len(done))}


def _color_position_checks(images: Images, prompts: Sequence[str]) -> list[tuple | None]:
    """Per sample: (colour ok, position ok), each ``None`` where not asked for; ``None`` for an ignored prompt."""
    checks: list[tuple | None] = []
    for image, prompt in zip(images, prompts, strict=True):
        want = _single(prompt)
        if want is None:
            checks.append(None)
            continue
        found = detect_objects(image)
        top = found[0] if found else {}  # no object at all fails every check it is asked for
        checks.append(tuple(None if want[k] is None else top.get(k) == want[k] for k in ("color", "position")))
    return checks


def _summarise_color_position(checks: Sequence[tuple | None]) -> dict[str, float]:
    done = [c for c in checks if c is not None]
    out = {**_rate([c for c, _ in done], "color"), **_rate([p for _, p in done], "position")}
    return {**out, "ignored_n": float(len(checks) - len(done))}


def color_position_accuracy(images: Images, prompts: Sequence[str]) -> dict[str, float]:
    """Colour and position accuracy (percent) of images against their single-object prompts.

    Colour is right when the largest object :func:`detect_objects` finds has the prompted colour (no object: wrong),
    position when its 3x3 cell is the prompted one (only prompts naming a position). Other prompts (several objects,
    none parsed) are counted in ``ignored_n``. Also ``color_n``, ``position_n``; an ``_acc`` with no checks is left out.
    """
    return _summarise_color_position(_color_position_checks(images, prompts))


class ShapeClassifier(nn.Module):
    """Small CNN: 64x64 RGB in [0, 1] -> 8 shape logits, translation invariant through global average pooling.

    Four conv-BN-ReLU-maxpool blocks and a linear head; ~61k parameters, receptive field 38 px (shapes: <= 32 px)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        channels, layers = (3, width // 2, width, 2 * width, 2 * width), []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):  # no conv bias: the batch norm has one
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], len(SHAPES))
        self.info: dict = {}  # how it was trained and its held-out accuracy; saved with the weights

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features((images - 0.5) / 0.25).mean(dim=(2, 3)))


def _to_batch(images: Images) -> Tensor:
    """(N, 3, 64, 64) float tensor in [0, 1]; images of another (common) size are resized, bilinear."""
    batch = torch.from_numpy(np.stack([_as_rgb(image) for image in images])).permute(0, 3, 1, 2) / 255.0
    return batch if batch.shape[2:] == (IMAGE_SIZE,) * 2 else F.interpolate(batch, IMAGE_SIZE, mode="bilinear")


def train_shape_classifier(
    steps: int = 600, batch_size: int = 64, seed: int = 0, progress: bool = False, heldout: int = 1000
) -> ShapeClassifier:
    """Train a :class:`ShapeClassifier` on freshly rendered single-object scenes of the synthetic *train* split.

    The train split holds no ``HELDOUT_COMBOS``: unseen colour-shape combinations stay unseen for the evaluator too;
    nothing is shared with any generative model. Half of each batch is blurred and noised, as generated images are.
    Adam, cosine decay, CUDA when available; the global RNG is left as it was. Accuracy on ``heldout`` val renders
    (``heldout_prompts(heldout, seed)``, ~30% unseen) goes into ``.info``: ``shape_acc``, ``seen/``, ``unseen/``.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng([seed, 0x5A4E])  # a stream of its own, apart from the dataset's per-sample ones
    start = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    for step in range(steps):
        scenes: list[dict] = []
        while len(scenes) < batch_size:
            scene = sample_scene(rng, "train")
            scenes += [scene] if scene["n_objects"] == 1 else []
        images = _to_batch([render_scene(s, IMAGE_SIZE) for s in scenes]).to(device)
        labels = torch.tensor([SHAPES.index(s["label"]) for s in scenes], device=device)
        half = images[: batch_size // 2]  # a view: degraded in place
        half.copy_(gaussian_blur(half, kernel_size=5, sigma=float(rng.uniform(0.4, 1.2))))
        half.add_(torch.from_numpy(rng.normal(0, rng.uniform(0, 0.05), half.shape).astype(np.float32)).to(device))
        loss = F.cross_entropy(model(images.clamp_(0.0, 1.0)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step + 1) % 100 == 0:
            print(f"shape classifier step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    model.eval().info = {"steps": steps, "batch_size": batch_size, "seed": seed, "seconds": time.time() - start}
    if heldout > 0:
        prompts, metas = heldout_prompts(heldout, seed)
        checks = _shape_checks([render_scene(m, IMAGE_SIZE) for m in metas], prompts, model)
        for prefix, keep in _subsets([m["unseen"] for m in metas]).items():
            model.info.update({prefix + k: v for k, v in _rate([checks[i] for i in keep], "shape").items()})
    return model


def save_shape_classifier(classifier: ShapeClassifier, path: str | os.PathLike) -> None:
    """Write ``classifier`` as one safetensors file (config and ``info`` as JSON metadata), atomically."""
    config = json.dumps({"width": classifier.width, "shapes": list(SHAPES), "info": classifier.info})
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"  # same folder, so os.replace is a rename
    save_file(state, tmp, metadata={"config": config})
    os.replace(tmp, path)


def load_shape_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> ShapeClassifier:
    """The classifier :func:`save_shape_classifier` wrote, in eval mode; nothing is unpickled."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            config = json.loads(f.metadata()["config"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exn:  # truncated, not safetensors, or safetensors without our metadata
        raise ValueError(f"{path}: not a shape classifier file ({type(exn).__name__}: {exn})") from None
    if config["shapes"] != list(SHAPES):
        raise ValueError(f"{path} was trained on shapes {config['shapes']}, not {list(SHAPES)}")
    classifier = ShapeClassifier(config["width"]).to(device)
    classifier.load_state_dict(state)
    classifier.info = config["info"]
    return classifier.eval()


@torch.no_grad()
def _shape_checks(images: Images, prompts: Sequence[str], clf: ShapeClassifier) -> list[bool | None]:
    """Per sample: whether ``clf`` labels the image with the prompted shape; ``None`` for an ignored prompt."""
    wanted = [_single(p) for _, p in zip(images, prompts, strict=True)]  # strict: lengths must agree
    keep = [i for i, w in enumerate(wanted) if w is not None]
    checks: list[bool | None] = [None] * len(prompts)
    device, was_training = next(clf.parameters()).device, clf.training
    clf.eval()  # batch statistics would make a sample's label depend on its batch
    for start in range(0, len(keep), 256):
        chunk = keep[start : start + 256]
        predicted = clf(_to_batch([images[i] for i in chunk]).to(device)).argmax(-1).tolist()
        for i, p in zip(chunk, predicted, strict=True):
            checks[i] = SHAPES[p] == wanted[i]["shape"]
    clf.train(was_training)
    return checks


def shape_accuracy(images: Images, prompts: Sequence[str], classifier: ShapeClassifier) -> dict[str, float]:
    """Percent of single-object prompts whose image ``classifier`` labels with the prompted shape.

    Keys ``shape_acc`` (left out when no prompt has a single object) and ``shape_n``; other prompts are skipped.
    """
    return _rate(_shape_checks(images, prompts, classifier), "shape")


def _r_precision_hits(
    image_emb: Tensor, prompt_emb: Tensor, distractors: int, seed: int, prompts: Sequence[str] | None
) -> np.ndarray:
    """Per image: whether its own prompt ranks strictly first among itself and ``distractors`` others."""
    if image_emb.shape != prompt_emb.shape or image_emb.ndim != 2 or distractors < 1:
        got = f"{tuple(image_emb.shape)}, {tuple(prompt_emb.shape)}, {distractors}"
        raise ValueError(f"need two (N, E) embeddings of one shape and distractors >= 1, got {got}")
    images = F.normalize(image_emb.detach().float().cpu(), dim=-1)
    texts = F.normalize(prompt_emb.detach().float().cpu(), dim=-1)
    # Distractors are distinct prompts other than the right one (never a copy of it, which would tie): one row per
    # string, or per embedding when strings are not given (a deterministic text encoder maps equal strings alike).
    keys = list(prompts) if prompts is not None else [row.numpy().tobytes() for row in prompt_emb.detach().cpu()]
    if len(keys) != len(images):
        raise ValueError(f"{len(keys)} prompts for {len(images)} embeddings")
    _, first, groups = np.unique(np.array(keys), return_index=True, return_inverse=True)
    if len(first) <= distractors:
        raise ValueError(f"{distractors} distractors need more than {len(first)} distinct prompts")
    rng = np.random.default_rng(seed)
    hits = np.zeros(len(images), bool)
    for i in range(len(images)):
        picks = torch.from_numpy(rng.choice(np.delete(first, groups[i]), distractors, replace=False))
        # Strictly first: a tie is a miss, so constant embeddings score 0, not 100.
        hits[i] = bool(images[i] @ texts[i] > (texts[picks] @ images[i]).max())
    return hits


def clip_r_precision(
    image_emb: Tensor, prompt_emb: Tensor, distractors: int = 31, seed: int = 0, prompts: Sequence[str] | None = None
) -> float:
    """CLIP R-precision (percent) of images against their prompts, from a contrastive model's embeddings.

    Row i of ``image_emb`` and ``prompt_emb`` (computed by the caller) belong together. Each image ranks by cosine
    similarity its own prompt and ``distractors`` others, drawn without replacement (seeded) from the other distinct
    prompts: distinct strings (``prompts`` given), or else distinct embeddings. R = 1 (one relevant prompt per
    image): the percent of images whose own prompt ranks strictly first; chance is 100 / (distractors + 1), 3.1%
    with 32 candidates.
    """
    return 100.0 * float(_r_precision_hits(image_emb, prompt_emb, distractors, seed, prompts).mean())


def _subsets(unseen: Sequence[bool]) -> dict[str, list[int]]:
    """Indices of all samples, the ``seen/`` and the ``unseen/`` ones; empty subsets left out."""
    masks = {"": [True] * len(unseen), "seen/": [not u for u in unseen], "unseen/": list(unseen)}
    return {prefix: [i for i, m in enumerate(mask) if m] for prefix, mask in masks.items() if any(mask)}


def generation_metrics(
    images: Images,
    prompts: Sequence[str],
    metas: Sequence[dict] | None = None,
    *,
    shape_classifier: ShapeClassifier | None = None,
    image_emb: Tensor | None = None,
    prompt_emb: Tensor | None = None,
    distractors: int = 31,
) -> dict[str, float]:
    """Every generation metric of images against their prompts: overall, and again per ``seen/`` and ``unseen/``.

    Always the :func:`color_position_accuracy` keys; ``shape_acc``, ``shape_n`` with a ``shape_classifier``;
    ``clip_r_precision`` (seed 0; subsets still draw distractors from all prompts) with both embeddings. A sample is
    unseen when its meta (the source scene's synthetic JSON) says so, or, without ``metas``, when its prompt names a
    ``HELDOUT_COMBOS`` colour-shape pair. Empty subsets are left out.
    """
    n = len(images)
    if len(prompts) != n or (metas is not None and len(metas) != n):
        raise ValueError(f"{n} images, {len(prompts)} prompts and {'no' if metas is None else len(metas)} metas")
    if (image_emb is None) != (prompt_emb is None):
        raise ValueError("pass both image_emb and prompt_emb, or neither")
    if metas is not None:
        unseen = [bool(m.get("unseen")) for m in metas]
    else:
        unseen = [any((o["color"], o["shape"]) in HELDOUT_COMBOS for o in prompt_objects(p)) for p in prompts]
    color_position = _color_position_checks(images, prompts)
    shapes = None if shape_classifier is None else _shape_checks(images, prompts, shape_classifier)
    hits = None if image_emb is None else _r_precision_hits(image_emb, prompt_emb, distractors, 0, prompts)
    out: dict[str, float] = {}
    for prefix, keep in _subsets(unseen).items():
        scores = _summarise_color_position([color_position[i] for i in keep])
        if shapes is not None:
            scores.update(_rate([shapes[i] for i in keep], "shape"))
        if hits is not None:
            scores["clip_r_precision"] = 100.0 * float(hits[keep].mean())
        out.update({prefix + k: v for k, v in scores.items()})
    return out


def heldout_prompts(n: int, seed: int = 0, single_object: bool = True) -> tuple[list[str], list[dict]]:
    """``n`` prompts and their scene JSON from the synthetic val split: ``make_sample(i, "val", seed)`` in order.

    The val shards' own captions and records (``meta["index"]`` is the sample), ~30% with a held-out colour-shape
    combination (``meta["unseen"]``); ``single_object`` skips scenes with several objects.
    """
    scenes = (json.loads(make_sample(index, "val", seed)["json"]) for index in itertools.count())
    metas = list(itertools.islice((m for m in scenes if m["n_objects"] == 1 or not single_object), n))
    return [m["caption"] for m in metas], metas
