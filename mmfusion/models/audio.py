"""Audio tower: a ViT over log-mel spectrogram patches (AST-like, Gong et al., 2021), projected into the
shared embedding space. Built with timm's VisionTransformer, like the image tower, with one input channel.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mmfusion.config import AudioTowerConfig

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # 10 ms at 16 kHz; must agree with mmfusion.data.audio's front end


def num_frames(cfg: AudioTowerConfig) -> int:
    """Spectrogram frames per clip: STFT with center=True gives 1 + samples // hop."""
    return 1 + round(cfg.duration * SAMPLE_RATE) // HOP_LENGTH


class AudioTower(nn.Module):
    def __init__(self, cfg: AudioTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        frames = num_frames(cfg) // cfg.patch_size * cfg.patch_size  # the last partial patch is dropped
        self.frames = frames
        self.trunk = VisionTransformer(
            img_size=(cfg.n_mels, frames),
            patch_size=cfg.patch_size,
            in_chans=1,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=0,
            global_pool="token",
            class_token=True,
        )
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, mels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, frames) log-mels -> projected pooled embedding (B, E), unnormalised, and tokens (B, 1 + N, W)."""
        tokens = self.trunk.forward_features(mels[:, None, :, : self.frames])  # (B, 1 + N, W)
        pooled = self.trunk.forward_head(tokens, pre_logits=True)  # (B, W)
        return self.proj(pooled), tokens
