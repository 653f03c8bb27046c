"""Contrastive losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

Both are open_clip's implementations (``ClipLoss`` gathers features across ranks with gradients so
negatives span the global batch; ``SigLipLoss`` exchanges text features between neighbouring ranks).
We only choose and configure them here; ``tests/test_losses.py`` checks them against naive formulas.
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

LOSSES = ("clip", "siglip")


def create_contrastive_loss(name: str, rank: int = 0, world_size: int = 1) -> nn.Module:
    if name == "clip":
        return ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    if name == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")


def contrastive_loss(loss_fn: nn.Module, out: dict) -> torch.Tensor:
    """Apply ``loss_fn`` to a model output dict in float32 (bf16 logits lose too much precision)."""
    image = out["image_features"].float()
    text = out["text_features"].float()
    scale = out["logit_scale"].float()
    if isinstance(loss_fn, SigLipLoss):
        return loss_fn(image, text, scale, out["logit_bias"].float())
    return loss_fn(image, text, scale)
