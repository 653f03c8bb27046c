"""Text tower: open_clip's causal TextTransformer over its BPE tokens, pooled at the EOT token.

Reused from open_clip (Radford et al., 2021 / Cherti et al., 2023) because it is exactly CLIP's text
encoder: causal self-attention, final LayerNorm, EOT ("argmax" of token ids) pooling, linear projection.
The tokenizer is open_clip's ``SimpleTokenizer``, whose vocabulary ships inside the package (offline).
"""

from __future__ import annotations

import re

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from mmfusion.config import TextConfig
from mmfusion.models.packed import Packing, run_block, self_attention_block

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
        """(B, L) ids -> projected EOT embedding (B, E), unnormalised, and the token states (B, L', W), zero at padding.

        This is open_clip's ``TextTransformer.forward`` (argmax pooling) computed two ways cheaper, with the same
        result at every real position. The states stop at the batch's longest caption (L' <= L): under causal
        attention no state before it reads the padding after it. And the blocks run on the real tokens only
        (:mod:`mmfusion.models.packed`): synthetic captions average 16 of 32 positions with start and end tokens,
        a batch of 128 reaches ~28, and a caption decoder's prefixes are shorter still.
        """
        t = self.transformer
        filled = tokens != PAD  # (B, L)
        columns = filled.any(dim=0).nonzero()  # columns where some caption still has a token
        length = int(columns.max()) + 1 if len(columns) else 1
        tokens = tokens[:, :length]
        packing = Packing(filled[:, :length])
        x = t.token_embedding(tokens.flatten()[packing.index]) + t.positional_embedding[packing.positions]  # (T, W)
        for block in t.transformer.resblocks:
            x = run_block(self_attention_block, block, x, packing, grad_checkpointing=t.transformer.grad_checkpointing)
        x = t.ln_final(x)  # (T, W)
        pooled = x[packing.rows_at(tokens.argmax(dim=1))]  # EOT: the largest id
        proj = t.text_projection  # None where a model reads only the states (the text-to-image generator)
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled, packing.unpack(x)


def create_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's BPE tokenizer: ``tokenizer(list_of_str) -> (B, context_length)`` LongTensor."""
    return SimpleTokenizer(context_length=context_length)


def caption_text(tokenizer: SimpleTokenizer, ids: list[int] | torch.Tensor) -> str:
    """Generated token ids as a caption: BPE decoding leaves a space before punctuation ("shapes : a circle ,"),
    which is removed, so captions read like the text they were trained on ("shapes: a circle,")."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return re.sub(r"\s+([,.;:!?])", r"\1", tokenizer.decode(ids)).strip()
