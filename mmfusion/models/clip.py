"""The dual-encoder CLIP model (Radford et al., 2021) with SigLIP's optional bias (Zhai et al., 2023)
and, when ``model.fusion.enabled``, the captioning/matching fusion head (:mod:`mmfusion.models.fusion`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.config import ModelConfig
from mmfusion.models.audio import AudioTower
from mmfusion.models.decoding import decode
from mmfusion.models.fusion import PAD, FusionHead
from mmfusion.models.text import TextTower
from mmfusion.models.vision import VisionTower


class CLIPModel(nn.Module):
    """Image and text towers projected into one L2-normalised embedding space.

    ``model(batch)`` always returns a dict: normalised ``image_features``/``text_features`` (B, E),
    ``image_tokens`` (B, 1 + N, W; with ``fusion=True`` and ``fusion.stem_memory`` the stem's map folded in),
    ``text_tokens`` (B, L, W) up to the batch's longest caption, ``logit_scale``
    (exp'd temperature) and, when the config has one, ``logit_bias``. ``model(batch, fusion=True)`` adds the
    fusion head's ``caption_loss``, ``match_loss`` and ``match_acc``; they are computed inside ``forward`` so
    that DistributedDataParallel sees every parameter used in its forward pass.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, stem_memory=cfg.fusion.enabled and cfg.fusion.stem_memory)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        # Created only for the sigmoid loss: an unused parameter would break DDP's gradient sync.
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.logit_bias else None
        audio_width = cfg.audio.width if cfg.audio.enabled else None
        self.fusion = None
        if cfg.fusion.enabled:
            self.fusion = FusionHead(cfg.fusion, cfg.text, cfg.vision.width, self.visual.num_tokens, audio_width)
        self.audio = AudioTower(cfg.audio, cfg.embed_dim) if cfg.audio.enabled else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        if self.fusion is not None:
            self.fusion.set_grad_checkpointing(enable)
        if self.audio is not None:
            self.audio.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides norms and biases."""
        names = {"logit_scale", "logit_bias"}
        names |= {f"visual.trunk.{n}" for n in self.visual.trunk.no_weight_decay()}
        names |= {f"text.transformer.{n}" for n in self.text.transformer.no_weight_decay()}
        if self.audio is not None:
            names |= {f"audio.trunk.{n}" for n in self.audio.trunk.no_weight_decay()}
        if self.fusion is not None and self.fusion.image_pos is not None:
            names.add("fusion.image_pos")
        return names

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features, _ = self.visual(images, with_stem=False)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features, _ = self.text(tokens)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_audio(self, mels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.audio is None:
            raise ValueError("this model has no audio tower: train it with model.audio.enabled=true")
        features, _ = self.audio(mels)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, batch: dict, fusion: bool = False) -> dict:
        out = {"logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if "image" in batch:
            # The stem's map only feeds the fusion head: a contrastive pass (the gradient cache's, evaluation) skips it.
            image_features, image_tokens = self.visual(batch["image"], with_stem=fusion)  # (B, E), (B, M, W)
            out["image_features"] = F.normalize(image_features, dim=-1)
            out["image_tokens"] = image_tokens
        if "text" in batch:
            text_features, text_tokens = self.text(batch["text"])  # (B, E), (B, L, W)
            out["text_features"] = F.normalize(text_features, dim=-1)
            out["text_tokens"] = text_tokens
        if "audio" in batch and self.audio is not None:
            audio_features, audio_tokens = self.audio(batch["audio"])  # (B, E), (B, 1 + N, W)
            out["audio_features"] = F.normalize(audio_features, dim=-1)
            out["audio_tokens"] = audio_tokens
        if fusion:
            if self.fusion is None:
                raise ValueError("this model has no fusion head (model.fusion.enabled=false)")
            with torch.no_grad():
                similarity = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, B)
            audio = (out["audio_tokens"], batch["has_audio"]) if "audio_tokens" in out else (None, None)
            out.update(self.fusion.losses(out["image_tokens"], out["text_tokens"], batch["text"], similarity, *audio))
        return out

    def _require_fusion(self) -> FusionHead:
        if self.fusion is None:
            raise ValueError("this model has no fusion head: train it with model.fusion.enabled=true")
        return self.fusion

    def match(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Matching logits (B,) of image i with caption i; ``sigmoid`` gives the probability that they match."""
        head = self._require_fusion()
        _, image_tokens = self.visual(images)
        _, text_states = self.text(tokens)  # (B, L', W): up to the longest caption
        memory, _ = head.memory(image_tokens)
        return head.match_logits(head.fuse(memory, text_states, tokens), tokens)

    def generate_captions(
        self,
        images: torch.Tensor,
        start_token: int,
        end_token: int,
        audio: torch.Tensor | None = None,
        **options,
    ) -> list[list[int]]:
        """Caption token ids (without start/end tokens) per image, optionally also hearing its clip (``audio``:
        (B, n_mels, frames) log-mels); ``options`` go to :func:`decoding.decode`."""
        head = self._require_fusion()
        _, image_tokens = self.visual(images)
        audio_tokens = None
        if audio is not None:
            if self.audio is None:
                raise ValueError("this model has no audio tower: train it with model.audio.enabled=true")
            _, audio_tokens = self.audio(audio)
        memory, _ = head.memory(image_tokens, audio_tokens)  # (B, M, W); every key valid
        context = self.cfg.text.context_length

        def step(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            prefix, rows = prefix.to(memory.device), rows.to(memory.device)  # prefixes hold no padding
            _, states = self.text(prefix)  # (N, length, W)
            hidden = head.fuse(memory[rows], states)  # (N, length, W)
            return head.next_token_log_probs(hidden[:, -1])  # (N, V)

        options.setdefault("max_new_tokens", context - 1)
        if options["max_new_tokens"] > context - 1:
            raise ValueError(f"max_new_tokens must be <= {context - 1} (the text context minus the start token)")
        banned = {PAD, start_token, *options.pop("banned_tokens", ())}
        return decode(
            step, images.shape[0], start_token=start_token, end_token=end_token, banned_tokens=sorted(banned), **options
        )
