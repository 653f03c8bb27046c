"""Training objectives as small tasks: ``step(model, micro_batches) -> (loss, metrics)``.

The contrastive task implements gradient accumulation that keeps the negatives of the whole
effective batch (Gao et al., 2021 "gradient cache"; open_clip's ``--accum-freq``): first embed every
micro-batch without gradients, then re-run each micro-batch with gradients and compute the loss
against the cached features of all the others. The towers' gradients sum to exactly the gradient of
the full-batch loss, at the cost of one extra forward pass. The temperature (and bias) would collect
the full loss's gradient once per micro-batch, so only the last micro-batch lets it through (the last,
because under DDP that backward is the synchronised one and must reach every parameter).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from mmfusion.train.losses import contrastive_loss


def _inputs(batch: dict, device: torch.device) -> dict:
    return {
        "image": batch["image"].to(device, non_blocking=True),
        "text": batch["text"].to(device, non_blocking=True),
    }


class ContrastiveTask:
    name = "contrastive"

    def __init__(self, loss_fn: nn.Module, device: torch.device, autocast: AbstractContextManager | None = None):
        self.loss_fn = loss_fn
        self.device = device
        self.autocast = autocast or nullcontext()

    def step(self, model: nn.Module, micro_batches: list[dict]) -> tuple[float, dict[str, float]]:
        """Forward + backward over one optimizer step's micro-batches; gradients are left in ``model``."""
        inputs = [_inputs(b, self.device) for b in micro_batches]
        if len(inputs) == 1:
            with self.autocast:
                out = model(inputs[0])
            loss = contrastive_loss(self.loss_fn, out)
            loss.backward()
            return loss.item(), {"logit_scale": out["logit_scale"].item()}

        with torch.no_grad(), self.autocast:
            cached = [model(x) for x in inputs]
        images = [c["image_features"] for c in cached]
        texts = [c["text_features"] for c in cached]
        for j, x in enumerate(inputs):
            # DDP: synchronise gradients only on the last micro-batch.
            sync = j == len(inputs) - 1
            with model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext(), self.autocast:
                out = model(x)
            full = {
                "image_features": torch.cat(images[:j] + [out["image_features"]] + images[j + 1 :]),  # (B_eff, E)
                "text_features": torch.cat(texts[:j] + [out["text_features"]] + texts[j + 1 :]),  # (B_eff, E)
                "logit_scale": out["logit_scale"] if sync else out["logit_scale"].detach(),
            }
            if "logit_bias" in out:
                full["logit_bias"] = out["logit_bias"] if sync else out["logit_bias"].detach()
            loss = contrastive_loss(self.loss_fn, full)
            loss.backward()
        return loss.item(), {"logit_scale": out["logit_scale"].item()}
