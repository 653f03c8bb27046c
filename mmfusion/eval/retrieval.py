"""Held-out evaluation: image<->text recall@K and zero-shot classification.

Positives are defined by caption text: an image counts as a correct hit for a text query when its
own caption is the same string (and vice versa). Identical strings are indistinguishable to the text
tower, so on data with repeated captions (the synthetic set, or several captions per image) this is
the only fair definition; on data with unique captions it is the usual one-to-one pairing.
When a sample's json carries ``"unseen": true`` (the synthetic held-out attribute combinations),
every metric is also reported on that subset under the ``unseen/`` prefix.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from mmfusion.eval.fusion import fusion_metrics

ZERO_SHOT_TEMPLATES = ("a {}.", "a photo of a {}.", "a picture of a {}.")


@torch.no_grad()
def embed_batches(
    model: nn.Module,
    batches,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
    pixels: list | None = None,
    audio: list | None = None,
):
    """Embed every batch of an eval stream; returns image (N, E), text (N, E) and the samples' metadata.

    When ``pixels`` is a list, the preprocessed image batches are appended to it (for the fusion head's metrics);
    when ``audio`` is a list and the batches carry audio, ``(audio embeddings (B, E), has_audio (B,))`` pairs.
    """
    images, texts, captions, metas = [], [], [], []
    model.eval()
    for batch in batches:
        if not batch["caption"]:  # a batch that only reports skipped samples
            continue
        inputs = {"image": batch["image"].to(device), "text": batch["text"].to(device)}
        if audio is not None and "audio" in batch:
            inputs["audio"] = batch["audio"].to(device)
        with autocast or nullcontext():
            out = model(inputs)
        if "audio_features" in out:
            audio.append((out["audio_features"].float().cpu(), batch["has_audio"]))
        images.append(out["image_features"].float().cpu())
        if pixels is not None:
            pixels.append(batch["image"])
        texts.append(out["text_features"].float().cpu())
        captions += batch["caption"]
        metas += [json.loads(m) if m else {} for m in batch["json"]]
    if not images:
        raise ValueError("the evaluation set is empty")
    return torch.cat(images), torch.cat(texts), captions, metas


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Share of queries (rows) with at least one positive among their top-k columns, in percent."""
    k_max = min(max(ks), similarity.shape[1])
    top = similarity.topk(k_max, dim=1).indices  # (Q, k_max)
    hit = positives.gather(1, top)  # (Q, k_max) bool
    return {f"R@{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    captions: list[str],
    ks=(1, 5, 10),
    subset: torch.Tensor | None = None,
) -> dict[str, float]:
    """text->image and image->text recall@k; ``subset`` (bool, N) restricts the queries, not the gallery."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    positives = caption_id[:, None] == caption_id[None, :]  # (N, N): same caption text
    sim = text_emb @ image_emb.T  # (N_text, N_image)
    rows = subset if subset is not None else torch.ones(len(captions), dtype=torch.bool)
    metrics = {}
    for k, v in recall_at_k(sim[rows], positives[rows], ks).items():
        metrics[f"text_to_image_{k}"] = v
    for k, v in recall_at_k(sim.T[rows], positives[rows], ks).items():
        metrics[f"image_to_text_{k}"] = v
    return metrics


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module, tokenizer, image_emb: torch.Tensor, labels: list[str], device: torch.device
) -> tuple[torch.Tensor, list[str]]:
    """Per-image correctness (bool, N) of zero-shot classification over the labels present."""
    classes = sorted(set(labels))
    weights = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in ZERO_SHOT_TEMPLATES]).to(device)
        emb = model({"text": tokens})["text_features"].float().cpu().mean(0)  # (E,)
        weights.append(emb / emb.norm())
    predicted = (image_emb @ torch.stack(weights).T).argmax(dim=1)  # (N,)
    truth = torch.tensor([classes.index(label) for label in labels])
    return predicted == truth, classes


def audio_metrics(
    audio_emb: torch.Tensor, has_audio: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor, captions, unseen
) -> dict[str, float]:
    """audio->image and audio->text recall@k for the samples with audio (the gallery is every sample);
    a hit shares the query's caption, as everywhere else."""
    if not has_audio.any():
        return {}
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    positives = (caption_id[:, None] == caption_id[None, :])[has_audio]  # (Q, N)
    metrics = {"audio_samples": float(has_audio.sum())}
    for name, gallery in (("image", image_emb), ("text", text_emb)):
        sim = audio_emb[has_audio] @ gallery.T  # (Q, N)
        for k, v in recall_at_k(sim, positives, (1, 5, 10)).items():
            metrics[f"audio_to_{name}_{k}"] = v
        rows = unseen[has_audio]
        if rows.any():
            for k, v in recall_at_k(sim[rows], positives[rows], (1, 5)).items():
                metrics[f"unseen/audio_to_{name}_{k}"] = v
    return metrics


def evaluate_embeddings(
    model: nn.Module, tokenizer, image_emb, text_emb, captions, metas, device: torch.device
) -> dict[str, float]:
    """All held-out metrics from precomputed embeddings (so the index can reuse exactly this code)."""
    metrics: dict[str, float] = {"eval_samples": float(len(captions))}
    metrics.update(retrieval_metrics(image_emb, text_emb, captions))
    unseen = torch.tensor([bool(m.get("unseen", False)) for m in metas])
    if unseen.any():
        metrics["unseen_samples"] = float(unseen.sum())
        metrics.update(
            {f"unseen/{k}": v for k, v in retrieval_metrics(image_emb, text_emb, captions, subset=unseen).items()}
        )
    labels = [m.get("label") for m in metas]
    if all(isinstance(label, str) for label in labels) and len(set(labels)) > 1:
        correct, _ = zero_shot_accuracy(model, tokenizer, image_emb, labels, device)
        metrics["zero_shot_top1"] = 100.0 * correct.float().mean().item()
        if unseen.any():
            metrics["unseen/zero_shot_top1"] = 100.0 * correct[unseen].float().mean().item()
    return metrics


def evaluate(model: nn.Module, tokenizer, batches, device: torch.device, autocast=None) -> dict[str, float]:
    """Embed an eval stream and compute every held-out metric (and the fusion head's, when the model has one)."""
    fusion = getattr(model, "fusion", None) is not None
    pixels: list | None = [] if fusion else None
    audio: list | None = [] if getattr(model, "audio", None) is not None else None
    image_emb, text_emb, captions, metas = embed_batches(model, batches, device, autocast, pixels, audio)
    with autocast or nullcontext():
        metrics = evaluate_embeddings(model, tokenizer, image_emb, text_emb, captions, metas, device)
    if audio:
        unseen = torch.tensor([bool(m.get("unseen", False)) for m in metas])
        audio_emb, has_audio = torch.cat([a for a, _ in audio]), torch.cat([h for _, h in audio])
        metrics.update(audio_metrics(audio_emb, has_audio, image_emb, text_emb, captions, unseen))
    if fusion:
        metrics.update(
            fusion_metrics(model, tokenizer, torch.cat(pixels), image_emb, text_emb, captions, metas, device, autocast)
        )
    return metrics
