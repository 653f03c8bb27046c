"""Image tower: a timm VisionTransformer configured by :class:`VisionConfig`, plus a projection.

We reuse timm's ViT (Dosovitskiy et al., 2021) rather than writing our own: its blocks already use
``F.scaled_dot_product_attention``, support gradient checkpointing, and are what users know.
The tower returns the pooled embedding *and* the patch tokens, which the fusion head attends over.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mmfusion.config import VisionConfig


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.trunk = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=0,
            global_pool=cfg.pool,
            class_token=True,
        )
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + N, W) normalised tokens, CLS first."""
        return self.trunk.forward_features(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the projected pooled embedding (B, E), unnormalised, and the tokens (B, 1 + N, W)."""
        tokens = self.forward_features(images)  # (B, 1 + N, W)
        pooled = self.trunk.forward_head(tokens, pre_logits=True)  # (B, W)
        return self.proj(pooled), tokens  # (B, E), (B, 1 + N, W)
