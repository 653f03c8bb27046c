"""Training objectives as small tasks: ``step(model, micro_batches) -> (loss, metrics)``.

The contrastive task implements gradient accumulation that keeps the negatives of the whole
effective batch (Gao et al., 2021 "gradient cache"; open_clip's ``--accum-freq``): first embed every
micro-batch without gradients, then re-run each micro-batch with gradients and compute the loss
against the cached features of all the others. The towers' gradients sum to exactly the gradient of
the full-batch loss, at the cost of one extra forward pass. The temperature (and bias) would collect
the full loss's gradient once per micro-batch, so only the last micro-batch lets it through (the last,
because under DDP that backward is the synchronised one and must reach every parameter).

With a fusion head, the captioning and matching losses are per-pair (matching negatives are mined
within each micro-batch), so each micro-batch adds its own share of them, divided by their number.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from mmfusion.train.losses import audio_binding_loss, contrastive_loss


def _inputs(batch: dict, device: torch.device) -> dict:
    keys = ("image", "image_tokens", "text", "audio", "has_audio")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


@dataclass(frozen=True)
class FusionWeights:
    """Loss weights of the joint objective; ``None`` in place of this means contrastive only."""

    contrastive: float = 1.0
    caption: float = 2.0
    match: float = 1.0


class ContrastiveTask:
    name = "contrastive"

    def __init__(
        self,
        loss_fn: nn.Module,
        device: torch.device,
        autocast: AbstractContextManager | None = None,
        fusion: FusionWeights | None = None,
        audio_weight: float | None = None,
    ):
        self.loss_fn = loss_fn
        self.device = device
        self.autocast = autocast or nullcontext()
        self.fusion = fusion
        self.audio_weight = audio_weight  # None: no audio tower

    def _audio_term(self, out: dict, x: dict, share: float, totals: dict[str, float]) -> torch.Tensor | float:
        """This micro-batch's weighted audio binding loss (samples without audio are masked out)."""
        if self.audio_weight is None:
            return 0.0
        loss = audio_binding_loss(out, x["has_audio"])
        totals["audio_loss"] = totals.get("audio_loss", 0.0) + share * loss.item()
        totals["audio_share"] = totals.get("audio_share", 0.0) + share * x["has_audio"].float().mean().item()
        return share * self.audio_weight * loss

    def _fusion_terms(self, out: dict, share: float, totals: dict[str, float]) -> torch.Tensor:
        """This micro-batch's weighted captioning + matching loss; accumulates the logged values."""
        for key in ("caption_loss", "match_loss", "match_acc"):
            totals[key] = totals.get(key, 0.0) + share * out[key].item()
        return share * (self.fusion.caption * out["caption_loss"] + self.fusion.match * out["match_loss"])

    def step(self, model: nn.Module, micro_batches: list[dict]) -> tuple[float, dict[str, float]]:
        """Forward + backward over one optimizer step's micro-batches; gradients are left in ``model``.

        Returns the total (weighted) loss and the parts worth logging separately.
        """
        inputs = [_inputs(b, self.device) for b in micro_batches]
        fused = self.fusion is not None
        w_contrastive = self.fusion.contrastive if fused else 1.0
        metrics: dict[str, float] = {}
        n = len(inputs)
        if n > 1:  # the gradient cache: every micro-batch's features, without gradients
            with torch.no_grad(), self.autocast:
                cached = [model(x) for x in inputs]
            images = [c["image_features"] for c in cached]
            texts = [c["text_features"] for c in cached]
        for j, x in enumerate(inputs):
            # DDP: synchronise gradients only on the last micro-batch.
            sync = j == n - 1
            with model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext(), self.autocast:
                out = model(x, fusion=fused)
            full = out
            if n > 1:
                full = {
                    "image_features": torch.cat(images[:j] + [out["image_features"]] + images[j + 1 :]),  # (B_eff, E)
                    "text_features": torch.cat(texts[:j] + [out["text_features"]] + texts[j + 1 :]),  # (B_eff, E)
                    "logit_scale": out["logit_scale"] if sync else out["logit_scale"].detach(),
                }
                if "logit_bias" in out:
                    full["logit_bias"] = out["logit_bias"] if sync else out["logit_bias"].detach()
            contrastive = contrastive_loss(self.loss_fn, full)  # the same value on every micro-batch
            loss = w_contrastive * contrastive
            if fused:
                loss = loss + self._fusion_terms(out, 1.0 / n, metrics)
            loss = loss + self._audio_term(out, x, 1.0 / n, metrics)
            loss.backward()
        total = w_contrastive * contrastive.item()
        if fused or self.audio_weight is not None:
            metrics["contrastive_loss"] = contrastive.item()
        if fused:
            total += self.fusion.caption * metrics["caption_loss"] + self.fusion.match * metrics["match_loss"]
        if self.audio_weight is not None:
            total += self.audio_weight * metrics["audio_loss"]
        return total, {"logit_scale": out["logit_scale"].item(), **metrics}


class LossTask:
    """For models whose forward returns their own ``loss`` (the generation stages): plain gradient accumulation,
    each micro-batch's loss divided by their number; other scalar outputs are logged."""

    name = "loss"

    def __init__(self, device: torch.device, autocast: AbstractContextManager | None = None):
        self.device = device
        self.autocast = autocast or nullcontext()

    def step(self, model: nn.Module, micro_batches: list[dict]) -> tuple[float, dict[str, float]]:
        total, metrics = 0.0, {}
        for j, batch in enumerate(micro_batches):
            x = _inputs(batch, self.device)
            sync = j == len(micro_batches) - 1
            with model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext(), self.autocast:
                out = model(x)
            (out["loss"] / len(micro_batches)).backward()
            total += out["loss"].item() / len(micro_batches)
            for key, value in out.items():
                if key != "loss" and (isinstance(value, float) or getattr(value, "ndim", 1) == 0):
                    metrics[key] = metrics.get(key, 0.0) + float(value) / len(micro_batches)
        return total, metrics
