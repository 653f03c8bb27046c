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

PAD = 0  # open_clip's tokenizer pads with id 0


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
        """(B, L) ids -> projected EOT embedding (B, E), unnormalised, and the token states (B, L', W).

        The states stop at the batch's longest caption (L' <= L): under causal attention no state before it reads
        the padding after it, so this is open_clip's ``TextTransformer.forward`` (argmax pooling) over fewer
        positions, with the same result. Why not call that: it always runs the full context. Synthetic captions
        average 14 of 32 tokens (a batch of 128 reaches ~26), and a caption decoder's prefixes are shorter still.
        """
        t = self.transformer
        filled = (tokens != PAD).any(dim=0).nonzero()  # columns where some caption still has a token
        length = int(filled.max()) + 1 if len(filled) else 1
        tokens = tokens[:, :length]
        x = t.token_embedding(tokens) + t.positional_embedding[:length]
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask[:length, :length]))  # (B, L', W)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=1)]  # EOT: the largest id
        proj = t.text_projection  # None where a model reads only the states (the text-to-image generator)
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled, x


def create_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's BPE tokenizer: ``tokenizer(list_of_str) -> (B, context_length)`` LongTensor."""
    return SimpleTokenizer(context_length=context_length)
