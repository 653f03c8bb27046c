"""Text-conditioned masked image-token generator (stage 2 of generation), MaskGIT-style.

A bidirectional transformer (Chang et al., 2022, "MaskGIT: Masked Generative Image Transformer") sees the
h * w image tokens of ``mmfusion.models.image_tokenizer`` with some replaced by ``mask_id`` and predicts the
masked ones. Each layer self-attends over the image tokens and then cross-attends to the text token states
(open_clip's ``ResidualAttentionBlock``, plain and with ``is_cross_attention=True``).

Choices worth knowing:

- Null condition for classifier-free guidance: a learned null text state is always prepended to the text
  memory and is always a valid key. Dropping the condition masks out every real text token, so the
  cross-attention reads the null state alone, whatever the text. Keeping the null state as a key also in the
  conditional case means a caption whose tokens are all padding never gives an all-masked attention row (NaN).
- Training masks ``ceil(cosine_schedule(r) * N)`` positions (at least 1) with r ~ U(0, 1) per sample, and the
  cross-entropy is the mean over masked positions of the whole batch. Condition dropout applies in training
  mode only, so an evaluation loss is always conditional.
- Sampling: all tokens start masked; each step samples every masked position (Gumbel-max at ``temperature``;
  0 means argmax) from the guided logits, scores it by its log-probability under the sampling distribution,
  and keeps the most confident so that ``N - ceil(cosine_schedule((t + 1) / steps) * N)`` tokens are fixed
  after step t (all after the last). Fixed tokens are never revisited. ``choice_noise`` adds MaskGIT's Gumbel
  noise to the confidences, annealed linearly to 0 over the steps, for more diverse samples; it is off by
  default so that the rule stays "most probable first".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.nn import functional as F

from mmfusion.config import GeneratorConfig


def cosine_schedule(r: torch.Tensor | float) -> torch.Tensor | float:
    """MaskGIT's mask ratio ``cos(pi / 2 * r)``: 1 at r = 0, exactly 0 at r >= 1, decreasing in between."""
    if isinstance(r, torch.Tensor):
        return torch.where(r >= 1, torch.zeros_like(r), torch.cos(math.pi / 2 * r))
    # cos(pi / 2) is 6e-17 in floating point, and ceil(6e-17 * N) = 1 would leave a token masked.
    return 0.0 if r >= 1 else math.cos(math.pi / 2 * r)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + guidance * (cond - uncond)`` (1: conditional, 0: unconditional)."""
    return uncond + guidance * (cond - uncond)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, N, V) against targets (B, N) over the positions where mask (B, N) is True."""
    return F.cross_entropy(logits[mask].float(), targets[mask])


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Draw on the generator's own device so a CPU generator also seeds a GPU model; then move.
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = _uniform(shape, generator, device).clamp(1e-20, 1.0)
    return -torch.log((-torch.log(u)).clamp(min=1e-20))


class TokenGenerator(nn.Module):
    """Bidirectional transformer over (B, N) image tokens that cross-attends to text states (B, L, text_width)."""

    def __init__(self, cfg: GeneratorConfig, codebook_size: int, grid_size: int, text_width: int):
        """``cfg`` sizes the transformer; the image tokenizer fixes ``codebook_size`` and ``grid_size`` (tokens per
        side), the text tower ``text_width``."""
        super().__init__()
        self.cfg = cfg
        self.codebook_size = codebook_size
        self.num_tokens = grid_size**2
        self.mask_id = codebook_size  # the extra embedding row
        self.heads = cfg.heads
        self.token_embed = nn.Embedding(codebook_size + 1, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_tokens, cfg.width))
        self.text_proj = nn.Linear(text_width, cfg.width)
        self.null_text = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.self_blocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.cross_blocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, is_cross_attention=True)
            for _ in range(cfg.depth)
        )
        self.ln_out = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, codebook_size)
        for p in (self.token_embed.weight, self.pos_embed, self.null_text):
            nn.init.normal_(p, std=0.02)

    def _memory(
        self, text_states: torch.Tensor, text_mask: torch.Tensor, drop_condition: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys (B, 1 + L, W) and the additive attention mask (B * heads, N, 1 + L)."""
        b = text_states.shape[0]
        valid = text_mask.bool()  # (B, L)
        if drop_condition is not None:
            valid = valid & ~drop_condition.bool().unsqueeze(1)
        text = self.text_proj(text_states)  # (B, L, W)
        memory = torch.cat([self.null_text.expand(b, -1, -1).to(text.dtype), text], dim=1)  # (B, 1 + L, W)
        valid = torch.cat([valid.new_ones(b, 1), valid], dim=1)  # (B, 1 + L): the null state is always a key
        bias = torch.zeros(valid.shape, dtype=text.dtype, device=text.device).masked_fill(~valid, float("-inf"))
        # nn.MultiheadAttention wants one (N, S) mask per batch item and head.
        bias = bias[:, None, None, :].expand(b, self.heads, self.num_tokens, -1)  # (B, heads, N, 1 + L)
        return memory, bias.reshape(b * self.heads, self.num_tokens, -1)

    def forward(
        self,
        tokens: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        drop_condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, N, codebook_size) for tokens (B, N) holding ``mask_id`` at masked places.

        ``text_mask`` (B, L) is True at real text tokens (False at padding, id 0); ``drop_condition`` (B,) bool
        replaces the condition of those rows by the null condition.
        """
        x = self.token_embed(tokens) + self.pos_embed  # (B, N, W)
        memory, bias = self._memory(text_states, text_mask, drop_condition)
        for self_block, cross_block in zip(self.self_blocks, self.cross_blocks, strict=True):
            x = self_block(x)
            x = cross_block(x, k_x=memory, v_x=memory, attn_mask=bias)
        return self.head(self.ln_out(x))

    def mask_tokens(
        self, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs for clean tokens (B, N): (tokens with ``mask_id`` at masked places, mask (B, N) bool).

        Draws r ~ U(0, 1) per sample first (one ``generator`` call of shape (B,)), then masks
        ``ceil(cosine_schedule(r) * N)`` positions, at least 1, chosen uniformly.
        """
        b, n = tokens.shape
        r = _uniform((b,), generator, tokens.device)
        counts = torch.ceil(cosine_schedule(r) * n).long().clamp(1, n)  # (B,)
        ranks = _uniform((b, n), generator, tokens.device).argsort(dim=1).argsort(dim=1)  # random permutation
        mask = ranks < counts[:, None]  # (B, N)
        return tokens.masked_fill(mask, self.mask_id), mask

    def loss(
        self,
        tokens: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked-token cross-entropy for clean tokens (B, N); metrics: ``loss``, ``acc`` (masked), ``mask_ratio``.

        In training mode each sample's condition is dropped with probability ``cond_dropout`` (drawn after the
        masks, from the same ``generator``).
        """
        inputs, mask = self.mask_tokens(tokens, generator)
        drop = None
        if self.training and self.cfg.cond_dropout > 0:
            drop = _uniform((tokens.shape[0],), generator, tokens.device) < self.cfg.cond_dropout  # (B,)
        logits = self(inputs, text_states, text_mask, drop)  # (B, N, V)
        loss = masked_cross_entropy(logits, tokens, mask)
        with torch.no_grad():
            acc = (logits[mask].argmax(dim=-1) == tokens[mask]).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item(), "mask_ratio": mask.float().mean().item()}

    def _step_logits(
        self, tokens: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor, guidance: float
    ) -> torch.Tensor:
        if guidance == 1:
            return self(tokens, text_states, text_mask).float()
        b = tokens.shape[0]
        # Conditional and unconditional rows in one batch: the second half has its condition dropped.
        drop = torch.arange(2 * b, device=tokens.device) >= b
        both = self(tokens.repeat(2, 1), text_states.repeat(2, 1, 1), text_mask.repeat(2, 1), drop).float()
        return guided_logits(both[:b], both[b:], guidance)

    @torch.no_grad()
    def sample(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        steps: int = 8,
        guidance: float = 3.0,
        temperature: float = 1.0,
        choice_noise: float = 0.0,
        generator: torch.Generator | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, N) in [0, codebook_size) for text states (B, L, text_width), by iterative parallel decoding.

        ``callback(step, tokens)``, if given, sees the (B, N) tokens after each step, ``mask_id`` where still masked.
        The same ``generator`` seed (and batch) gives the same tokens.
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        b, n, device = text_states.shape[0], self.num_tokens, text_states.device
        tokens = torch.full((b, n), self.mask_id, dtype=torch.long, device=device)
        for step in range(steps):
            masked = tokens == self.mask_id  # (B, N)
            logits = self._step_logits(tokens, text_states, text_mask, guidance)  # (B, N, V)
            if temperature > 0:
                logits = logits / temperature
                sampled = (logits + _gumbel(logits.shape, generator, device)).argmax(dim=-1)  # (B, N)
            else:
                sampled = logits.argmax(dim=-1)
            confidence = logits.log_softmax(dim=-1).gather(-1, sampled[..., None]).squeeze(-1)  # (B, N)
            anneal = 1 - (step + 1) / steps
            if choice_noise > 0 and anneal > 0:
                confidence = confidence + choice_noise * anneal * _gumbel(confidence.shape, generator, device)
            # Already fixed tokens rank first, so they always stay.
            confidence = confidence.masked_fill(~masked, float("inf"))
            n_fixed = n - math.ceil(cosine_schedule((step + 1) / steps) * n)
            keep = torch.zeros_like(masked)
            if n_fixed > 0:
                keep.scatter_(1, confidence.topk(n_fixed, dim=1).indices, True)
            tokens = torch.where(masked & keep, sampled, tokens)
            if callback is not None:
                callback(step, tokens)
        return tokens
