"""The dual-encoder CLIP model (Radford et al., 2021) with SigLIP's optional bias (Zhai et al., 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.config import ModelConfig
from mmfusion.models.text import TextTower
from mmfusion.models.vision import VisionTower


class CLIPModel(nn.Module):
    """Image and text towers projected into one L2-normalised embedding space.

    ``model(batch)`` always returns a dict: normalised ``image_features``/``text_features`` (B, E),
    ``image_tokens`` (B, 1 + N, W), ``text_tokens`` (B, L, W), ``logit_scale`` (exp'd temperature)
    and, when the config has one, ``logit_bias``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        # Created only for the sigmoid loss: an unused parameter would break DDP's gradient sync.
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.logit_bias else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides norms and biases."""
        names = {"logit_scale", "logit_bias"}
        names |= {f"visual.trunk.{n}" for n in self.visual.trunk.no_weight_decay()}
        names |= {f"text.transformer.{n}" for n in self.text.transformer.no_weight_decay()}
        return names

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features, _ = self.visual(images)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features, _ = self.text(tokens)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, batch: dict) -> dict:
        out = {"logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if "image" in batch:
            image_features, image_tokens = self.visual(batch["image"])  # (B, E), (B, 1 + N, W)
            out["image_features"] = F.normalize(image_features, dim=-1)
            out["image_tokens"] = image_tokens
        if "text" in batch:
            text_features, text_tokens = self.text(batch["text"])  # (B, E), (B, L, W)
            out["text_features"] = F.normalize(text_features, dim=-1)
            out["text_tokens"] = text_tokens
        return out
