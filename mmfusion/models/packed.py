"""open_clip's causal transformer blocks, computed on the real tokens of right-padded captions only.

A batch of captions is padded to its longest one: synthetic captions average 16 tokens with start and end
where a batch of 128 reaches ~28, so nearly half the rows a text layer computes are padding. Under causal
attention no real token reads the padding after it, and every loss reads real positions only, so the
position-wise parts of a block (norms, projections, MLP: at width 128 nearly all of its work) run on the
(T, W) real rows; attention alone sees the (B, L) grid, with zeros in the padding rows. At real positions the
result equals open_clip's ``ResidualAttentionBlock`` (up to float rounding); padding positions come back zero.

The blocks' own parameters are used, so checkpoints and open_clip's initialisation are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Packing:
    """Which positions of a (B, L) token grid are real, and moves between padded (B, L, C) and packed (T, C) rows.

    ``filled`` (B, L) bool marks non-padding tokens. A row's real positions run up to its last one, so a ``!``
    inside a caption (id 0, open_clip's padding id) still counts, as does every position of a decoding prefix.
    Position 0 always counts: a row of padding only keeps one state, where open_clip's argmax pooling reads it.
    """

    def __init__(self, filled: torch.Tensor):
        self.batch, self.length = filled.shape
        positions = torch.arange(self.length, device=filled.device)
        last = torch.where(filled, positions, 0).amax(dim=1)  # (B,) last real position, at least 0
        self.real = positions <= last[:, None]  # (B, L)
        self.index = self.real.flatten().nonzero().squeeze(1)  # (T,) rows of the flattened grid
        self.positions = self.index % self.length  # (T,) position of each packed row in its caption
        counts = self.real.sum(dim=1)  # (B,)
        self.starts = counts.cumsum(dim=0) - counts  # (B,) first packed row of each caption

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (T, C)."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (B, L, C), zeros at padding positions."""
        grid = x.new_zeros(self.batch * self.length, x.shape[-1])
        return grid.index_copy(0, self.index, x).view(self.batch, self.length, -1)

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Packed row (B,) of position ``positions[b]`` of caption b (e.g. its end token)."""
        return self.starts + positions


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, W) -> (B, heads, L, W / heads)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attention(attn: nn.MultiheadAttention, q, k, v, packing: Packing, causal: bool, key_mask=None) -> torch.Tensor:
    """Padded queries (B, L, W), keys and values (B, M, W) -> packed attention output (T, W)."""
    heads = attn.num_heads
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M), True = attend
    out = F.scaled_dot_product_attention(
        _heads(q, heads), _heads(k, heads), _heads(v, heads), attn_mask=mask, is_causal=causal
    )
    out = packing.pack(out.transpose(1, 2).flatten(2))  # (T, W)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def self_attention_block(block: nn.Module, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """A causal open_clip ``ResidualAttentionBlock`` on packed rows (T, W)."""
    attn = block.attn
    qkv = packing.unpack(F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias))  # (B, L, 3W)
    q, k, v = qkv.chunk(3, dim=-1)
    x = x + block.ls_1(_attention(attn, q, k, v, packing, causal=True))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def cross_attention_block(
    block: nn.Module, x: torch.Tensor, packing: Packing, memory: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """An open_clip cross-attention ``ResidualAttentionBlock``: packed rows (T, W) read memory (B, M, W);
    ``key_mask`` (B, M) bool, True where a memory token may be read (None: all)."""
    attn, width = block.attn, x.shape[-1]
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    q = packing.unpack(F.linear(block.ln_1(x), weight[:width], bias[:width]))  # (B, L, W)
    k, v = F.linear(block.ln_1_kv(memory), weight[width:], bias[width:]).chunk(2, dim=-1)  # (B, M, W) each
    x = x + block.ls_1(_attention(attn, q, k, v, packing, causal=False, key_mask=key_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def run_block(fn, *args, grad_checkpointing: bool = False) -> torch.Tensor:
    """``fn(*args)``, recomputed in the backward pass instead of stored when ``grad_checkpointing``."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
