"""Held-out evaluation of the text-to-image stage, as the training loop runs it at the end of stage 2.

The conditional validation loss of the generator, then images generated for the held-out single-object
captions, scored from pixels (:func:`mmfusion.eval.generation.generation_metrics`: colour and position; shape
accuracy with an evaluator classifier trained separately on synthetic images, CLIP R-precision with a separately
trained contrastive model, when given: ``tools/eval.py --shape-classifier PATH --clip RUN``).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from mmfusion.data.transforms import to_pil_images
from mmfusion.eval.generation import (
    color_position_accuracy,
    generation_metrics,
    load_shape_classifier,
    save_shape_classifier,
    train_shape_classifier,
)

MAX_PROMPTS = 200


@torch.no_grad()
def generate_for_prompts(
    model: nn.Module, tokenizer, prompts: list[str], device: torch.device, seed: int = 0, batch_size: int = 64, **kw
) -> list:
    """Decoded images (PIL) for ``prompts``; ``kw`` go to the model's ``generate`` (steps, guidance, temperature)."""
    rng = torch.Generator(device).manual_seed(seed)
    images = []
    for i in range(0, len(prompts), batch_size):
        _, pixels = model.generate(tokenizer(prompts[i : i + batch_size]).to(device), generator=rng, **kw)
        images += to_pil_images(pixels)
    return images


@torch.no_grad()
def text_to_image_metrics(
    model: nn.Module,
    tokenizer,
    batches,
    device: torch.device,
    autocast=None,
    max_prompts: int = MAX_PROMPTS,
    shape_classifier: nn.Module | None = None,
    clip=None,
) -> dict[str, float]:
    """Validation loss, then generation metrics on up to ``max_prompts`` held-out single-object captions.
    ``clip``: a loaded contrastive model (:class:`mmfusion.api.MMFusion`) for R-precision.

    Also ``recon/color_acc`` and ``recon/position_acc``: the same scores for the image tokenizer's reconstructions
    of those prompts' own images, the most the generator can reach when it draws through that tokenizer."""
    model.eval()
    total, n, prompts, metas, recons = 0.0, 0, [], [], []
    for batch in batches:
        if not batch["caption"]:
            continue
        with autocast or nullcontext():  # encode once: for the loss and for the reconstructions below
            tokens = model.tokenizer.encode(batch["image"].to(device))  # (B, h, w)
            out = model({"image_tokens": tokens, "text": batch["text"].to(device)})
        total += out["loss"].item() * len(batch["caption"])
        n += len(batch["caption"])
        prompts += batch["caption"]
        batch_metas = [json.loads(m) if m else {} for m in batch["json"]]
        metas += batch_metas
        single = [i for i, m in enumerate(batch_metas) if m.get("n_objects") == 1]
        if single and len(recons) < max_prompts:
            with autocast or nullcontext():
                recons += to_pil_images(model.tokenizer.decode(tokens[single]).float())
    if not n:
        raise ValueError("the evaluation set is empty")
    metrics = {"eval_samples": float(n), "val_loss": total / n}
    single = [(p, m) for p, m in zip(prompts, metas, strict=True) if m.get("n_objects") == 1][:max_prompts]
    if single:
        texts = [p for p, _ in single]
        images = generate_for_prompts(model, tokenizer, texts, device)
        embeddings = {}
        if clip is not None:
            embeddings = {"image_emb": clip.encode_image(images), "prompt_emb": clip.encode_text(texts)}
        metrics.update(
            generation_metrics(images, texts, [m for _, m in single], shape_classifier=shape_classifier, **embeddings)
        )
        ceiling = color_position_accuracy(recons[: len(texts)], texts)
        metrics.update({f"recon/{k}": v for k, v in ceiling.items() if k.endswith("_acc")})
    return metrics


def load_or_train_shape_classifier(path: str | Path, progress: bool = True) -> nn.Module:
    """The shape evaluator saved at ``path``; when there is none yet, train one (a few minutes on 2 cores) and save
    it there, so every later evaluation uses the same one."""
    if Path(path).is_file():
        return load_shape_classifier(path)
    classifier = train_shape_classifier(progress=progress)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_shape_classifier(classifier, path)
    return classifier
