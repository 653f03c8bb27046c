"""One small factory: ``create_model(name_or_cfg, **overrides)`` and ``list_models()``."""

from __future__ import annotations

from typing import Any

from torch import nn

from mmfusion.config import ModelConfig, RunConfig, from_dict, list_configs, load_config, to_dict
from mmfusion.models.clip import CLIPModel
from mmfusion.models.text_to_image import ImageTokenizerModel, TextToImageModel


def list_models() -> list[str]:
    """Names of the shipped model configs (``configs/*.yaml``)."""
    return list_configs()


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def resolve_model_config(name_or_cfg: str | ModelConfig | RunConfig = "tiny", **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a config name, a YAML path or a config, with keyword overrides.

    Nested overrides are dicts: ``resolve_model_config("tiny", vision={"depth": 2}, embed_dim=128)``.
    """
    if isinstance(name_or_cfg, RunConfig):
        cfg = name_or_cfg.model
    elif isinstance(name_or_cfg, ModelConfig):
        cfg = name_or_cfg
    else:
        cfg = load_config(name_or_cfg).model
    if overrides:
        cfg = from_dict(ModelConfig, _merge(to_dict(cfg), overrides))
    return cfg


MODELS = {"clip": CLIPModel, "image_tokenizer": ImageTokenizerModel, "text_to_image": TextToImageModel}


def create_model(name_or_cfg: str | ModelConfig | RunConfig = "tiny", **overrides: Any) -> nn.Module:
    """Build a randomly initialised model from a config name (``"tiny"``), a YAML path or a config;
    ``model.kind`` picks the class (the CLIP model by default, or a generation stage)."""
    cfg = resolve_model_config(name_or_cfg, **overrides)
    return MODELS[cfg.kind](cfg)
