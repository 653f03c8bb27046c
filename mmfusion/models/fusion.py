"""The fusion head: one multimodal decoder for captioning (CoCa) and image-text matching (BLIP).

Following CoCa (Yu et al., 2022, "Contrastive Captioners are Image-Text Foundation Models"), the text
tower's causal token states feed a few more causal layers that also cross-attend to the image tokens
(open_clip's ``MultimodalTransformer``). Its hidden state at position t predicts token t + 1, so one
pass over a caption gives the captioning loss; the state at the end token has seen the whole caption
and the image, so a binary head on it scores whether they match, as BLIP's image-text matching head
does (Li et al., 2022), trained on hard negatives drawn from the contrastive similarities.

Why reuse the text tower instead of a separate decoder: the contrastive forward pass already computes
the causal states, so captioning costs only the extra multimodal layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer
from torch import nn

from mmfusion.config import FusionConfig, TextConfig
from mmfusion.models.packed import Packing, cross_attention_block, run_block, self_attention_block
from mmfusion.models.text import PAD


def bpe_class_order(vocab_size: int) -> torch.Tensor:
    """Token ids in the adaptive softmax's class order (V,) when no caption counts are known.

    The adaptive softmax wants frequent classes first; BPE ids roughly follow frequency in web text except the
    start/end tokens, which are the last two ids. Rotating by two puts them at classes 0 and 1.
    """
    return (torch.arange(vocab_size) - 2) % vocab_size


def sample_hard_negatives(similarity: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each row, a column drawn with probability softmax(similarity) among its non-positive columns.

    ``positive`` (R, C) bool marks pairs that must not be drawn (same caption). A row without any
    negative draws any other column; callers label pairs by ``positive`` so such a draw stays correct.
    """
    weights = similarity.float().softmax(dim=1).masked_fill(positive, 0.0)  # (R, C)
    empty = weights.sum(dim=1) <= 0
    if empty.any():
        others = ~torch.eye(*similarity.shape, dtype=torch.bool, device=similarity.device)
        weights[empty] = others[empty].float()
    return torch.multinomial(weights, 1).squeeze(1)  # (R,)


def rerank_score(match_logits: torch.Tensor, similarity: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """The score that reranks contrastive candidates: matching logit + contrastive logit (temperature x cosine).

    Summing both, as BLIP's retrieval does, keeps the contrastive order where the matching head is unsure
    (early in training its logits hover near zero and alone they rank worse than the contrastive scores).
    """
    return match_logits.float() + logit_scale * similarity.float()


class FusionHead(nn.Module):
    """Causal multimodal layers over text states with cross-attention to image tokens, plus two heads."""

    def __init__(
        self,
        cfg: FusionConfig,
        text_cfg: TextConfig,
        vision_width: int,
        image_tokens: int,
        audio_width: int | None = None,
    ):
        super().__init__()
        width = text_cfg.width
        self.vocab_size = text_cfg.vocab_size
        self.heads = cfg.heads
        self.match_negatives = cfg.match_negatives
        self.focal_gamma = cfg.caption_focal_gamma
        self.image_proj = nn.Linear(vision_width, width)
        # Where an object is must reach the caption's position words. The ViT's own position embedding starts
        # at std 0.02 under content of std ~1 and is mixed away by its blocks; only a direct signal (a label per
        # image) grows it fast. Joint training left caption positions at chance after 900 steps, even with a conv stem
        # that learns them from labels in 100 (benchmarks/probe_vision_stem.py). So the decoder gets its own
        # embedding per image token at the scale of the projected content (std ~0.58): it finds the object by
        # content (the colour it has just named) and reads its place from this.
        self.image_pos = None
        if cfg.image_position_embedding:
            self.image_pos = nn.Parameter(0.5 * torch.randn(1, image_tokens, width))
        # Audio tokens, when the model has an audio tower, join the image tokens in the cross-attention memory.
        self.audio_proj = nn.Linear(audio_width, width) if audio_width else None
        self.decoder = MultimodalTransformer(
            width=width,
            layers=cfg.depth,
            heads=cfg.heads,
            context_length=text_cfg.context_length,
            mlp_ratio=cfg.mlp_ratio,
            output_dim=width,
        )
        self.decoder.text_projection = None  # the heads below read the normalised hidden states
        self.lm_head = nn.AdaptiveLogSoftmaxWithLoss(width, text_cfg.vocab_size, list(cfg.vocab_cutoffs), div_value=2.0)
        # class_of_id[token id] = its adaptive-softmax class. With vocab_order=data, set_vocab_order fills it from the
        # training captions and checkpoints keep it; with bpe it is the fixed rotation and not saved (older layout).
        order = bpe_class_order(self.vocab_size)
        self.register_buffer("class_of_id", torch.argsort(order), persistent=cfg.vocab_order == "data")
        self.match_head = nn.Linear(width, 1)
        self._init_weights(width, cfg.depth)

    def _init_weights(self, width: int, depth: int) -> None:
        # CLIP's text-transformer scheme: residual projections shrink with depth.
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * depth) ** -0.5, (2 * width) ** -0.5
        for block in [*self.decoder.resblocks, *self.decoder.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.decoder.set_grad_checkpointing(enable)

    @torch.no_grad()
    def set_vocab_order(self, token_counts: torch.Tensor) -> None:
        """Give the most frequent caption tokens the first adaptive-softmax classes (the full-width head).

        ``token_counts`` (V,): how often each id occurs in (a sample of) the training captions. Ties, unseen ids
        included, keep the BPE order. Why: BPE ids follow web-text frequency, so words common in a dataset but rare
        on the web land in the narrow tail clusters. In the synthetic captions six of the eight shape words did
        ("triangle" is id 14,615, "hexagon" two ids past 14,000), where each is a guess among ~39,000 classes
        through a 32-wide projection; with this order all 63 caption tokens sit in the head.
        """
        if token_counts.shape != (self.vocab_size,):
            raise ValueError(f"token_counts must have shape ({self.vocab_size},), got {tuple(token_counts.shape)}")
        bpe = bpe_class_order(self.vocab_size)
        order = bpe[torch.argsort(-token_counts[bpe].double(), stable=True)]  # ids, most frequent first
        self.class_of_id.copy_(torch.argsort(order).to(self.class_of_id.device))

    def memory(
        self,
        image_tokens: torch.Tensor,
        audio_tokens: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-attention memory (B, M, W) and its key mask (B, M) bool, or None when every key is valid.

        Image tokens (B, 1 + N, W_vision) always; audio tokens (B, 1 + A, W_audio) appended when given, with the
        rows whose ``has_audio`` is False masked out, so a missing clip is not read as silence.
        """
        memory = self.image_proj(image_tokens)
        if self.image_pos is not None:
            memory = memory + self.image_pos.to(memory.dtype)
        if audio_tokens is None or self.audio_proj is None:
            return memory, None
        valid = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)  # (B, 1 + N)
        audio_valid = (
            has_audio[:, None].expand(-1, audio_tokens.shape[1])
            if has_audio is not None
            else torch.ones(audio_tokens.shape[:2], dtype=torch.bool, device=memory.device)
        )  # (B, 1 + A)
        memory = torch.cat([memory, self.audio_proj(audio_tokens)], dim=1)  # (B, M, W)
        return memory, torch.cat([valid, audio_valid], dim=1)

    def fuse(
        self,
        memory: torch.Tensor,
        text_states: torch.Tensor,
        tokens: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, M, W) memory and (B, L, W) causal text states -> (B, L, W) fused, normalised states.

        ``tokens`` (B, >= L), the states' ids: the layers then skip padding (:mod:`mmfusion.models.packed`) and
        its states come back zero; None treats every position as real (a decoding prefix). ``key_mask`` (B, M)
        bool: which memory tokens may be read (None: all). open_clip's ``MultimodalTransformer`` computes the
        same at real positions but over the padding too, and passes no mask to its cross-attention.
        """
        batch, length = text_states.shape[:2]
        if tokens is None:
            filled = torch.ones(batch, length, dtype=torch.bool, device=text_states.device)
        else:
            filled = tokens[:, :length] != PAD
        packing = Packing(filled)
        x = packing.pack(text_states)  # (T, W)
        checkpointing = self.decoder.grad_checkpointing
        for block, cross in zip(self.decoder.resblocks, self.decoder.cross_attn, strict=True):
            x = run_block(self_attention_block, block, x, packing, grad_checkpointing=checkpointing)
            x = run_block(cross_attention_block, cross, x, packing, memory, key_mask, grad_checkpointing=checkpointing)
        return packing.unpack(self.decoder.ln_final(x))

    def caption_loss(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token negative log-likelihood, a (focal-weighted) mean over tokens; padding targets are left out."""
        targets = tokens[:, 1 : hidden.shape[1] + 1]  # (B, L - 1)
        keep = targets != PAD
        states = hidden[:, : targets.shape[1]][keep]  # (T, W)
        # Outside autocast: the adaptive softmax mixes dtypes in place, and fp32 log-probs are needed anyway.
        with torch.autocast(hidden.device.type, enabled=False):
            out = self.lm_head(states.float(), self.class_of_id[targets[keep]])
        if self.focal_gamma == 0:
            return out.loss
        nll = -out.output  # (T,)
        # The weights steer which tokens count, not how much the loss weighs in all: normalised by their
        # (detached) sum, the loss stays a mean NLL and train.caption_weight keeps its meaning.
        weight = (1.0 - torch.exp(-nll)).pow(self.focal_gamma).detach()  # (1 - p_t)^gamma
        return (weight * nll).sum() / weight.sum().clamp_min(1e-6)

    def next_token_log_probs(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """(N, W) states at the last prefix position -> (N, V) log-probabilities indexed by token id."""
        with torch.autocast(hidden_last.device.type, enabled=False):
            log_probs = self.lm_head.log_prob(hidden_last.float())  # (N, V), class order
        return log_probs[:, self.class_of_id]  # column id reads its class

    def match_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Matching logit (B,) from the state at each caption's end token (the largest id, as in CLIP)."""
        end = tokens[:, : hidden.shape[1]].argmax(dim=1)  # (B,)
        return self.match_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), end]).squeeze(1).float()

    def losses(
        self,
        image_tokens: torch.Tensor,
        text_states: torch.Tensor,
        tokens: torch.Tensor,
        similarity: torch.Tensor,
        audio_tokens: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Captioning and matching losses for a batch of matching (image, caption) pairs.

        ``similarity`` (B, B) is the detached image-text similarity of the contrastive embeddings, used
        to mine hard negatives for the first ``match_negatives`` x B pairs: the first half of those pair their
        image with a hard negative caption, the second half their caption with a hard negative image. Every
        pair's positive score comes from the captioning pass; positives weigh ``match_negatives`` each, so
        matching stays balanced (1 positive : 1 negative) at a fraction of one extra decoder pass.
        """
        batch = tokens.shape[0]
        tokens = tokens[:, : text_states.shape[1]]  # the text tower stops at the longest caption (TextTower)
        memory, key_mask = self.memory(image_tokens, audio_tokens, has_audio)  # (B, M, W), (B, M) | None
        hidden = self.fuse(memory, text_states, tokens, key_mask)  # (B, L, W)
        out = {"caption_loss": self.caption_loss(hidden, tokens)}

        same_caption = (tokens[:, None, :] == tokens[None, :, :]).all(dim=2)  # (B, B)
        ones = torch.ones(batch, device=tokens.device)
        logits, labels, weights = [self.match_logits(hidden, tokens)], [ones], [ones]
        negatives = min(batch, round(self.match_negatives * batch))
        if batch > 1 and negatives > 0:
            half, arange = negatives // 2, torch.arange(batch, device=tokens.device)
            negative_text = sample_hard_negatives(similarity[:half], same_caption[:half])  # (half,)
            negative_image = sample_hard_negatives(similarity.T[half:negatives], same_caption[half:negatives])
            image_rows = torch.cat([arange[:half], negative_image])  # (negatives,)
            text_rows = torch.cat([negative_text, arange[half:negatives]])
            mask = key_mask[image_rows] if key_mask is not None else None  # a clip goes with its image
            hidden = self.fuse(memory[image_rows], text_states[text_rows], tokens[text_rows], mask)
            logits.append(self.match_logits(hidden, tokens[text_rows]))
            labels.append(same_caption[image_rows, text_rows].float())
            weights = [ones * (negatives / batch), torch.ones(negatives, device=tokens.device)]
        logits, labels, weights = torch.cat(logits), torch.cat(labels), torch.cat(weights)
        per_pair = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        out["match_loss"] = (weights * per_pair).sum() / weights.sum()
        out["match_acc"] = ((logits > 0) == labels.bool()).float().mean().detach()
        return out
