"""Typed configuration: frozen dataclasses, YAML recipes and ``key.sub=value`` overrides.

A run is described by one :class:`RunConfig` with a sub-config per part (``model``, ``data``,
``train``). Recipes live in ``configs/<name>.yaml`` (shipped as package data, so
``create_model("tiny")`` works from an installed wheel); the file stem is the model name.

Why frozen dataclasses and not dicts: a typo in a key (``train.epoch=5``) must fail loudly with the
list of valid keys instead of silently training with the default, and a resolved config must be
saved verbatim in every checkpoint so a run rebuilds itself offline.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"

# CLIP's normalisation constants: a sane default that matches what open_clip/timm users expect.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    _check(value in choices, f"'{key}' must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        _check(getattr(obj, name) > 0, f"'{name}' must be > 0, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    pool: str = "token"  # "token" (CLS) or "avg" over patch tokens
    stem: str = "patch"  # "patch": a linear map per patch (ViT); "conv": stride-2 3x3 convs down to the patch grid
    # Channels of the conv stem's last stage; each earlier stage has half as many (at least 8). 0: width / 2.
    stem_width: int = 0
    # Channels of a stride-1 3x3 conv at full image resolution ahead of the stride-2 stages; 0: none. The first
    # stride-2 conv halves a 14 px shape before anything has looked at its outline (see conv_stem).
    stem_full_res_width: int = 0
    # Channels of a stride-1 3x3 conv at half resolution, right after the first stride-2 stage; 0: none.
    stem_half_res_width: int = 0

    def __post_init__(self):
        _check_positive(self, "image_size", "patch_size", "width", "depth", "heads")
        _check_choice(self.pool, ("token", "avg"), "vision.pool")
        _check_choice(self.stem, ("patch", "conv"), "vision.stem")
        _check(self.stem_width >= 0, f"vision.stem_width must be >= 0 (0: width / 2), got {self.stem_width}")
        _check(
            self.stem_full_res_width >= 0,
            f"vision.stem_full_res_width must be >= 0 (0: none), got {self.stem_full_res_width}",
        )
        _check(
            self.stem_half_res_width >= 0,
            f"vision.stem_half_res_width must be >= 0 (0: none), got {self.stem_half_res_width}",
        )
        _check(
            self.stem == "patch" or self.patch_size & (self.patch_size - 1) == 0,
            "vision.patch_size must be a power of two with vision.stem=conv",
        )
        _check(self.image_size % self.patch_size == 0, "vision.image_size must be a multiple of vision.patch_size")
        _check(self.width % self.heads == 0, "vision.width must be a multiple of vision.heads")


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 32
    vocab_size: int = 49408  # open_clip's BPE vocabulary
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self):
        _check_positive(self, "context_length", "vocab_size", "width", "depth", "heads")
        _check(self.width % self.heads == 0, "text.width must be a multiple of text.heads")


@dataclass(frozen=True)
class PreprocessConfig:
    """Eval-time image preprocessing; saved in every checkpoint so a model rebuilds its transform."""

    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class FusionConfig:
    """The fusion head (CoCa-style decoder, BLIP-style matching): off unless ``enabled``."""

    enabled: bool = False
    depth: int = 2  # multimodal layers on top of the text tower; the width is the text tower's
    heads: int = 4
    mlp_ratio: float = 4.0
    # Adaptive softmax (Grave et al., 2017) over the BPE vocabulary: a full 49k-way softmax per caption
    # token would cost more than both towers on a CPU; frequent ids (BPE ids roughly follow frequency)
    # get the full width, rarer ones a narrower projection.
    vocab_cutoffs: tuple[int, ...] = (2000, 10000)
    # Which ids get the head's classes: "bpe", the BPE ids' own order (their web-text frequency); "data", the token
    # frequencies of the first 5,000 training captions, counted when a run starts and saved with its weights.
    vocab_order: str = "bpe"
    # A learned position embedding on the image tokens the decoder reads, at the scale of their content (see
    # FusionHead). False keeps the layout of checkpoints saved before it existed.
    image_position_embedding: bool = False
    # Image-text matching: the share of the batch's pairs that also get a hard negative (half of them a negative
    # caption, half a negative image) in the second decoder pass; positives come free from the captioning pass and
    # are down-weighted to balance. 1.0 is BLIP-like 1:1 at a full extra pass, 0.5 halves that pass.
    match_negatives: float = 1.0
    # Captioning loss as a focal-weighted mean over tokens (Lin et al., 2017): token t weighs (1 - p_t)^gamma,
    # normalised by the total weight, so once the function words are easy the loss is carried by the words that
    # name what is in the image. 0 is the plain mean (CoCa).
    caption_focal_gamma: float = 0.0
    # Each patch token the decoder reads also gets a projection (Linear + LayerNorm) of the 2x2 block of the conv stem's
    # map one stride-2 stage before the patch grid, added after pooling (VisionTower): a 16 px token is too coarse for
    # the shape of a 14-18 px object, which is what captions got wrong. Needs vision.stem=conv, so off here; tiny turns
    # it on (its comment and README, Results, have five seeds with and without it).
    stem_memory: bool = False

    def __post_init__(self):
        _check_positive(self, "depth", "heads")
        _check(0.0 < self.match_negatives <= 1.0, "fusion.match_negatives must be in (0, 1]")
        _check(self.caption_focal_gamma >= 0.0, "fusion.caption_focal_gamma must be >= 0")
        _check_choice(self.vocab_order, ("bpe", "data"), "fusion.vocab_order")
        cutoffs = list(self.vocab_cutoffs)
        _check(cutoffs == sorted(set(cutoffs)) and all(c > 0 for c in cutoffs), "fusion.vocab_cutoffs must increase")


@dataclass(frozen=True)
class AudioTowerConfig:
    """The audio branch (ImageBind/CLAP-style binding into the shared space): off unless ``enabled``.

    Clips are mono 16 kHz, cropped or padded to ``duration`` seconds, as 64-band log-mels with a 10 ms hop
    (:mod:`mmfusion.data.audio`); a ViT over ``patch_size`` x ``patch_size`` spectrogram patches encodes them
    (AST-like, Gong et al., 2021).
    """

    enabled: bool = False
    duration: float = 1.0
    n_mels: int = 64
    patch_size: int = 16
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self):
        _check_positive(self, "duration", "n_mels", "patch_size", "width", "depth", "heads")
        _check(self.width % self.heads == 0, "audio.width must be a multiple of audio.heads")
        _check(self.n_mels % self.patch_size == 0, "audio.n_mels must be a multiple of audio.patch_size")


@dataclass(frozen=True)
class ImageTokenizerConfig:
    """Stage 1 of generation: ``len(channels) - 1`` stride-2 downsamplings give a grid of side
    ``image_size / 2 ** (len(channels) - 1)``; ``levels`` are the FSQ levels per latent dimension."""

    image_size: int = 64
    channels: tuple[int, ...] = (64, 128, 256)
    levels: tuple[int, ...] = (8, 5, 5, 5)  # codebook of 8 * 5 * 5 * 5 = 1000
    blocks: int = 1  # residual blocks per resolution, in the encoder and the decoder

    def __post_init__(self):
        _check(len(self.channels) >= 1 and min(self.channels) > 0, "image_tokenizer.channels must be positive")
        _check(len(self.levels) >= 1 and min(self.levels) >= 2, "image_tokenizer.levels must be >= 2")
        _check(self.image_size % 2 ** (len(self.channels) - 1) == 0, "image_tokenizer.image_size must divide evenly")


GENERATOR_KINDS = ("masked", "autoregressive")


@dataclass(frozen=True)
class GeneratorConfig:
    """Stage 2 of generation: the image-token transformer conditioned on the text tower's token states.

    ``kind``: ``masked`` (MaskGIT: all tokens start masked, the most confident are fixed over a few parallel steps)
    or ``autoregressive`` (raster order, one token per step). ``guidance`` and ``top_k`` are sampling defaults that
    ``generate`` calls can override. An autoregressive generator wants less guidance than a masked one (1.5 against
    3.0 on the synthetic data: see ``mmfusion.models.generator``), so set both when switching kinds.
    """

    kind: str = "masked"  # old checkpoints have no kind: they are all masked generators
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    cond_dropout: float = 0.1  # share of training samples trained without text, for classifier-free guidance
    # Cross-attend to the caption's word embeddings as well as the text tower's output states: see
    # mmfusion.models.text_to_image for why (colour and position words are bound much sooner).
    word_memory: bool = True
    guidance: float = 3.0  # classifier-free guidance scale at sampling; 1 = none
    top_k: int = 0  # sampling draws from the k most probable codes only; 0 = all

    def __post_init__(self):
        _check_choice(self.kind, GENERATOR_KINDS, "generator.kind")
        _check_positive(self, "width", "depth", "heads")
        _check(self.top_k >= 0, "generator.top_k must be >= 0 (0 samples from every code)")
        _check(self.guidance >= 0, "generator.guidance must be >= 0")
        _check(self.width % self.heads == 0, "generator.width must be a multiple of generator.heads")
        # 1 trains an unconditional generator (the text is never read): unusual, but well defined.
        _check(0 <= self.cond_dropout <= 1, "generator.cond_dropout must be in [0, 1]")


MODEL_KINDS = ("clip", "image_tokenizer", "text_to_image")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    # "clip": the towers (+ fusion head, audio); "image_tokenizer" / "text_to_image": the two generation stages.
    kind: str = "clip"
    embed_dim: int = 256
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature
    logit_bias: bool = False  # a learnable bias, for the sigmoid loss (train.loss=siglip turns it on)
    init_logit_bias: float = -10.0  # SigLIP's initial bias
    fusion: FusionConfig = field(default_factory=FusionConfig)
    audio: AudioTowerConfig = field(default_factory=AudioTowerConfig)
    image_tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    # text_to_image: the stage-1 checkpoint whose tokenizer weights start stage 2 (tools/train.py sets it).
    tokenizer_checkpoint: str = ""

    def __post_init__(self):
        _check_choice(self.kind, MODEL_KINDS, "model.kind")
        if self.fusion.enabled:
            _check(self.text.width % self.fusion.heads == 0, "text.width must be a multiple of fusion.heads")
            _check(self.fusion.vocab_cutoffs[-1] < self.text.vocab_size, "fusion.vocab_cutoffs must be < vocab_size")
            _check(
                not self.fusion.stem_memory or (self.vision.stem == "conv" and self.vision.patch_size >= 4),
                "fusion.stem_memory needs vision.stem=conv and vision.patch_size >= 4 (two stride-2 stages); "
                "set model.fusion.stem_memory=false for another image tower",
            )


@dataclass(frozen=True)
class DataConfig:
    # Shard pattern(s) (brace/glob patterns, "::"-separated lists, pipe:/URLs) or "synthetic".
    train: str = "synthetic"
    val: str = "synthetic"  # "" disables held-out evaluation
    train_samples: int = 0  # samples in one epoch of `train`; 0 = count local shards at start
    synthetic_dir: str = "runs/.synthetic"  # cache for the built-in dataset's shards
    synthetic_train: int = 20000
    synthetic_val: int = 1000
    synthetic_seed: int = 0
    synthetic_audio: bool = False  # give every synthetic scene a sound clip (for the audio branch)
    workers: int = 1
    shuffle_buffer: int = 1000
    # Train augmentation. No flips or colour jitter by default: captions name colours and sides.
    crop_scale_min: float = 0.8
    hflip: bool = False

    def __post_init__(self):
        _check(self.workers >= 0 and self.train_samples >= 0, "data.workers and data.train_samples must be >= 0")
        _check(0 < self.crop_scale_min <= 1, f"data.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")


@dataclass(frozen=True)
class TrainConfig:
    loss: str = "clip"  # "clip" (InfoNCE) or "siglip" (sigmoid)
    batch_size: int = 64  # per rank and micro-batch; effective batch = batch_size * accum_steps * world
    accum_steps: int = 1
    epochs: float = 1.0
    steps: int = 0  # > 0 overrides epochs
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where it is faster (AMX, GPUs)
    device: str = "auto"  # "auto", "cpu", "cuda"
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = only at the end
    checkpoint_every: int = 500  # steps
    checkpoint_every_minutes: float = 10.0
    keep_last: int = 2
    tensorboard: bool = True
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # Loss weights when model.fusion.enabled (CoCa weighs captioning 2:1 against contrastive).
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    match_weight: float = 1.0
    audio_weight: float = 1.0  # weight of the mean of the audio<->text and audio<->image losses
    # text_to_image recipes: stage 1 (the image tokenizer) trains for this many steps at this learning rate.
    tokenizer_steps: int = 300
    tokenizer_lr: float = 1e-3
    pretokenize: bool = True  # stage 2 reads images encoded once by stage 1's tokenizer (no augmentation)

    def __post_init__(self):
        _check_choice(self.loss, ("clip", "siglip"), "train.loss")
        _check_choice(self.precision, ("auto", "bf16", "fp32"), "train.precision")
        _check_choice(self.device.split(":")[0], ("auto", "cpu", "cuda"), "train.device")
        _check_positive(self, "batch_size", "accum_steps", "log_every", "checkpoint_every", "keep_last")
        _check(self.epochs > 0 or self.steps > 0, "set train.epochs or train.steps to a positive number")
        _check(min(self.steps, self.warmup_steps, self.eval_every, self.lr) >= 0, "steps and lr must be >= 0")
        weights = (self.contrastive_weight, self.caption_weight, self.match_weight, self.audio_weight)
        _check(min(weights) >= 0, "loss weights must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{where}{key}'{hint}; valid keys: {', '.join(sorted(valid))}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where it is lossless."""
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"unsupported annotation for '{key}'")  # keep the schema simple on purpose
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"unsupported annotation {tp} for '{key}'")
    raise ConfigError(f"'{key}' expects {tp.__name__}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys and ill-typed values."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(key, list(types_), prefix)
        kwargs[key] = _coerce(value, types_[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-able dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def _parse_override_value(raw: str, tp: Any) -> Any:
    # Strings are taken verbatim: a shard pattern like "{000..009}.tar" is not YAML.
    if tp is str:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exn:
        raise ConfigError(f"cannot parse value {raw!r}: {exn}") from None


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply ``key.sub=value`` overrides, e.g. ``["train.epochs=5", "model.vision.depth=4"]``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        path, raw = item.split("=", 1)
        cfg = _replace_path(cfg, path.strip().split("."), raw, "")
    return cfg


def _replace_path(node: Any, parts: list[str], raw: str, where: str) -> Any:
    types_ = _field_types(type(node))
    key = parts[0]
    if key not in types_:
        raise _unknown_key(key, list(types_), where)
    tp = types_[key]
    if len(parts) == 1:
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"'{where}{key}' is a section; set one of its keys, e.g. {where}{key}.<key>=...")
        value = _coerce(_parse_override_value(raw, tp), tp, where + key)
    else:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"'{where}{key}' is not a section")
        value = _replace_path(getattr(node, key), parts[1:], raw, f"{where}{key}.")
    return dataclasses.replace(node, **{key: value})


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or a config name (``"tiny"``) looked up in the shipped configs."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown config '{name_or_path}'; available: {', '.join(list_configs())}")
    return candidate


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces; an empty section keeps base's."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(base.get(key), dict) and (value is None or isinstance(value, dict)):
            out[key] = _merge(base[key], value or {})
        else:
            out[key] = value
    return out


def _read_recipe(path: Path, including: tuple[Path, ...] = ()) -> dict:
    """A YAML recipe as a dict, with its ``base:`` recipe (a config name or a path beside it) merged underneath."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exn:
        raise ConfigError(f"{path}: invalid YAML: {exn}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name a config or a YAML file, got {base!r}")
    try:
        base_path = resolve_config_path(path.parent / base if base.endswith((".yaml", ".yml")) else base)
    except ConfigError as exn:
        raise ConfigError(f"{path}: base: {exn}") from None
    chain = (*including, path.resolve())
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: base '{base}' leads back to itself")
    return _merge(_read_recipe(base_path, chain), data)


def load_config(name_or_path: str | Path = "tiny", overrides: list[str] | None = None) -> RunConfig:
    """Load a run recipe from YAML, apply overrides, and default the model name to the file stem.

    A recipe may start from another (``base: tiny``) and list only what it changes; see ``configs/tiny-fusion.yaml``.
    """
    path = resolve_config_path(name_or_path)
    data = _read_recipe(path)
    for section in ("model", "data", "train"):
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping, got {data[section]!r}")
    data["model"].setdefault("name", path.stem)
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as exn:
        raise ConfigError(f"{path}: {exn}") from None
    return apply_overrides(cfg, overrides or [])
