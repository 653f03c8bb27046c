"""Text tower: open_clip's causal TextTransformer over its BPE tokens, pooled at the EOT token.

Reused from open_clip (Radford et al., 2021 / Cherti et al., 2023) because it is exactly CLIP's text
encoder: causal self-attention, final LayerNorm, EOT ("argmax" of token ids) pooling, linear projection.
The tokenizer is open_clip's ``SimpleTokenizer``, whose vocabulary ships inside the package (offline).
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from mmfusion.config import TextConfig


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.transformer = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.width,
            heads=cfg.heads,
            layers=cfg.depth,
            mlp_ratio=cfg.mlp_ratio,
            output_dim=embed_dim,
            pool_type="argmax",  # EOT has the largest id in CLIP's vocabulary
            output_tokens=True,
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> projected EOT embedding (B, E), unnormalised, and the token states (B, L, W)."""
        pooled, states = self.transformer(tokens)  # (B, E), (B, L, W)
        return pooled, states


def create_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's BPE tokenizer: ``tokenizer(list_of_str) -> (B, context_length)`` LongTensor."""
    return SimpleTokenizer(context_length=context_length)
