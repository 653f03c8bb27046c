"""Held-out metrics of the fusion head: reranked text->image recall and generated-caption quality.

Reranking follows the index's recipe (:meth:`mmfusion.index.SearchIndex.search` with ``rerank=True``):
the contrastive top-``candidates`` images of each text query are reordered by the fused score
(:func:`mmfusion.models.fusion.rerank_score`: matching logit + contrastive logit), so
``text_to_image_R@1_reranked`` sits beside the contrastive ``text_to_image_R@1`` it should improve on.
Captions are decoded greedily and scored by :func:`mmfusion.eval.caption.caption_metrics`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from mmfusion.eval.caption import caption_metrics
from mmfusion.models.fusion import rerank_score
from mmfusion.models.text import caption_text

RERANK_CANDIDATES = 10


@torch.no_grad()
def _match_candidates(model: nn.Module, memory: torch.Tensor, tokens: torch.Tensor, candidates: torch.Tensor):
    """Matching logits (Q, C) of query caption q with candidate images ``candidates[q]``."""
    head = model.fusion
    _, states = model.text(tokens)  # (Q, L', W): up to the longest caption
    candidates = candidates.to(tokens.device)
    queries, n = candidates.shape
    rows = torch.arange(queries, device=tokens.device).repeat_interleave(n)  # (Q * C,)
    hidden = head.fuse(memory[candidates.reshape(-1)], states[rows], tokens[rows])  # (Q * C, L, W)
    return head.match_logits(hidden, tokens[rows]).view(queries, n)


@torch.no_grad()
def rerank_metrics(
    model: nn.Module,
    tokenizer,
    pixels: torch.Tensor,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    captions: list[str],
    unseen: torch.Tensor,
    device: torch.device,
    candidates: int = RERANK_CANDIDATES,
    batch_size: int = 64,
) -> dict[str, float]:
    """text->image R@1 after reranking each query's contrastive top-``candidates`` (positives: same caption):
    ``..._reranked`` by :func:`rerank_score` (what the index uses), ``..._match_only`` by the matching head alone."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    top_sim, top = (text_emb @ image_emb.T).topk(min(candidates, len(captions)), dim=1)  # (N, C)
    scale = model.logit_scale.detach().exp().item()
    memory = torch.cat(
        [
            model.fusion.memory(model.visual(pixels[i : i + batch_size].to(device))[1])[0]
            for i in range(0, len(pixels), batch_size)
        ]
    )  # (N, M, W)
    logits = torch.cat(
        [
            _match_candidates(
                model, memory, tokenizer(captions[i : i + batch_size]).to(device), top[i : i + batch_size]
            )
            for i in range(0, len(captions), batch_size)
        ]
    ).cpu()  # (N, C)
    metrics = {}
    for name, score in (("reranked", rerank_score(logits, top_sim, scale)), ("match_only", logits)):
        best = top.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)  # (N,)
        hit = caption_id[best] == caption_id  # (N,)
        metrics[f"text_to_image_R@1_{name}"] = 100.0 * hit.float().mean().item()
        if unseen.any():
            metrics[f"unseen/text_to_image_R@1_{name}"] = 100.0 * hit[unseen].float().mean().item()
    return metrics


@torch.no_grad()
def generate_captions(model: nn.Module, tokenizer, pixels: torch.Tensor, device: torch.device, batch_size: int = 128):
    """Greedy captions (with the default 4-gram guard) for preprocessed images (N, 3, S, S)."""
    out = []
    for i in range(0, len(pixels), batch_size):
        ids = model.generate_captions(
            pixels[i : i + batch_size].to(device), tokenizer.sot_token_id, tokenizer.eot_token_id, no_repeat_ngram=4
        )
        out += [caption_text(tokenizer, t) for t in ids]
    return out


def fusion_metrics(
    model: nn.Module,
    tokenizer,
    pixels: torch.Tensor,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    captions: list[str],
    metas: list[dict],
    device: torch.device,
    autocast=None,
) -> dict[str, float]:
    """Reranked retrieval and caption metrics (BLEU-4, CIDEr, synthetic attribute accuracy) on held-out data."""
    model.eval()
    unseen = torch.tensor([bool(m.get("unseen", False)) for m in metas])
    with autocast or nullcontext():
        metrics = rerank_metrics(model, tokenizer, pixels, image_emb, text_emb, captions, unseen, device)
        generated = generate_captions(model, tokenizer, pixels, device)
    metrics.update(caption_metrics(generated, [[c] for c in captions], metas))
    return metrics
