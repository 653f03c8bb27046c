"""Held-out metrics of the image tokenizer (generation stage 1): reconstruction PSNR and codebook usage."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn


@torch.no_grad()
def tokenizer_metrics(model: nn.Module, tokenizer, batches, device: torch.device, autocast=None) -> dict[str, float]:
    """PSNR (dB, images in [-1, 1] so the peak-to-peak range is 2) over all pixels of the held-out set, and the
    share of the codebook used and its perplexity (exp of the entropy of code frequencies). The text ``tokenizer``
    is unused; every evaluator takes the same arguments."""
    image_tokenizer = model.tokenizer
    image_tokenizer.eval()
    squared, pixels, n = 0.0, 0, 0
    counts = torch.zeros(image_tokenizer.codebook_size, dtype=torch.long)
    for batch in batches:
        if not batch["caption"]:
            continue
        images = batch["image"].to(device)
        with autocast or nullcontext():
            tokens = image_tokenizer.encode(images)
            recon = image_tokenizer.decode(tokens).float()
        squared += (recon - images).square().sum().item()
        pixels += images.numel()
        n += images.shape[0]
        counts += torch.bincount(tokens.flatten().cpu(), minlength=image_tokenizer.codebook_size)
    if not n:
        raise ValueError("the evaluation set is empty")
    mse = squared / pixels
    freq = counts.float() / counts.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()
    return {
        "eval_samples": float(n),
        "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
        "codebook_usage": 100.0 * (counts > 0).float().mean().item(),
        "codebook_perplexity": math.exp(entropy),
    }
