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


def audio_binding_loss(out: dict, has_audio: torch.Tensor) -> torch.Tensor:
    """Mean of the audio<->text and audio<->image InfoNCE losses over the samples that have audio.

    Audio is bound to the image-text space without pulling on it: the image and text features and the
    temperature are detached here, as ImageBind binds new modalities to frozen image/text encoders. With
    gradients into both towers, the tiny recipe lost 3.8 points of image->text R@1 (2.1 text->image).
    Negatives are the other local samples with audio (not gathered across ranks: their count differs per rank).
    With fewer than two such samples there is nothing to contrast: the loss is a zero that still touches every
    audio parameter, so DDP finds a gradient for each of them.
    """
    audio = out["audio_features"]
    if int(has_audio.sum()) < 2:
        return audio.sum() * 0.0
    a = audio[has_audio].float()
    scale = out["logit_scale"].detach().float()
    local = ClipLoss()  # world_size 1: plain symmetric InfoNCE over these rows
    text, image = (out[k][has_audio].detach().float() for k in ("text_features", "image_features"))
    return (local(a, text, scale) + local(a, image, scale)) / 2
