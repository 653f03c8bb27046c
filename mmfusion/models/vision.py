"""Image tower: a timm VisionTransformer configured by :class:`VisionConfig`, plus a projection.

We reuse timm's ViT (Dosovitskiy et al., 2021) rather than writing our own: its blocks already use
``F.scaled_dot_product_attention``, support gradient checkpointing, and are what users know.
The tower returns the pooled embedding *and* the patch tokens, which the fusion head attends over.

``vision.stem=conv`` swaps the patchify layer for a few stride-2 3x3 convolutions (Xiao et al., 2021, "Early
Convolutions Help Transformers See Better"), plugged in through timm's ``HybridEmbed``. A linear map per 8x8 patch
sees a small shape cut by patch borders as unrelated pixel blobs; overlapping convolutions see edges and corners.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from mmfusion.config import VisionConfig


def conv_stem(patch_size: int, channels: int, full_res_channels: int = 0, half_res_channels: int = 0) -> nn.Sequential:
    """log2(patch_size) stride-2 conv-norm-ReLU blocks ending in ``channels``, each earlier one with half as many
    (at least 8), after one stride-1 block with ``full_res_channels`` when that is > 0, and with one stride-1 block
    of ``half_res_channels`` after the first stride-2 block when that is > 0; HybridEmbed then maps them to the
    ViT's width.

    Why the stride-1 block: a small synthetic shape is 14-18 px wide at 64 px, and a stride-2 first layer halves it
    before any filter has seen its whole outline. Trained with a shape label per image for 300 steps, the tiny tower
    read shape 73.6% without it and 88.1% with 8 full-resolution channels at batch 128 (9% more tower time), and
    21.8% against 46.8% at batch 64 (``benchmarks/probe_vision_stem.py --stems conv --patch 16 --widths 128 --depth 3
    --stem-width 256 --full-res-widths 0 8``: 24 s against 33 s).

    The norm is GroupNorm with one group (each image normalised over all its channels and pixels), not Xiao et al.'s
    batch norm: batch statistics would make a sample's output depend on its batch, so gradient accumulation and DDP
    ranks would no longer add up to the full batch, and eval would differ from training. One group, not one per
    channel, keeps an image's overall colour, which captions name.
    """
    n = patch_size.bit_length() - 1
    widths = [max(channels >> (n - 1 - i), 8) for i in range(n)]
    strides = [2] * n
    if half_res_channels and n:  # a 1 px patch has no stride-2 stage to follow
        widths, strides = [widths[0], half_res_channels, *widths[1:]], [2, 1, *strides[1:]]
    if full_res_channels:
        widths, strides = [full_res_channels, *widths], [1, *strides]
    blocks, c_in = [], 3
    for c_out, stride in zip(widths, strides, strict=True):
        blocks += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*blocks)


def _conv_embed(cfg: VisionConfig, img_size, in_chans, embed_dim, bias, **_) -> HybridEmbed:
    # timm hands the ViT's patch size to its embed layer; after the stem each feature pixel is one token.
    backbone = conv_stem(
        cfg.patch_size, cfg.stem_width or cfg.width // 2, cfg.stem_full_res_width, cfg.stem_half_res_width
    )
    return HybridEmbed(backbone, img_size, patch_size=1, in_chans=in_chans, embed_dim=embed_dim, bias=bias)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, stem_memory: bool = False):
        super().__init__()
        self.cfg = cfg
        self.trunk = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=0,
            global_pool=cfg.pool,
            class_token=True,
            **({"embed_layer": partial(_conv_embed, cfg)} if cfg.stem == "conv" else {}),
        )
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)
        # fusion.stem_memory: the tokens the decoder reads also carry the stem's map one stride-2 stage before the patch
        # grid, each 2x2 block of it folded into the patch token it lies under (see forward).
        self.stem_tap, self.stem_proj = None, None
        if stem_memory:
            stem = self.trunk.patch_embed.backbone
            last = max(i for i, m in enumerate(stem) if isinstance(m, nn.Conv2d) and m.stride == (2, 2))
            self.stem_tap = last - 1  # index of the activation that the last stride-2 conv reads
            self.stem_proj = nn.Sequential(nn.Linear(4 * stem[last].in_channels, cfg.width), nn.LayerNorm(cfg.width))
        self.num_tokens = self.trunk.num_prefix_tokens + self.trunk.patch_embed.num_patches  # CLS + the patch grid

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + N, W) normalised ViT tokens, CLS first, then the (h, w) patch grid row-major."""
        if self.cfg.stem == "conv":  # oneDNN's convolutions: fwd + bwd of the tiny tower 11% faster on 2 CPU cores
            images = images.contiguous(memory_format=torch.channels_last)
        return self.trunk.forward_features(images)

    def _features_and_stem_map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT tokens (B, 1 + N, W) and the stem's map (B, C, 2h, 2w) that its last stride-2 conv read."""
        # timm's HybridEmbed keeps only its backbone's last output; a hook for the one forward reads the earlier map
        # without rewriting timm's forward (which would fork from it across versions).
        maps = []
        tap = self.trunk.patch_embed.backbone[self.stem_tap]
        handle = tap.register_forward_hook(lambda module, args, out: maps.append(out))
        try:
            tokens = self.forward_features(images)
        finally:
            handle.remove()
        return tokens, maps[0]

    def forward(self, images: torch.Tensor, with_stem: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the projected pooled embedding (B, E), unnormalised, and the tokens (B, 1 + N, W) the fusion head
        reads. With a stem memory (and ``with_stem``), each patch token also gets the projection of the 2x2 block of
        the stem's map under it, added after pooling, so the embedding never depends on it; ``with_stem=False``
        skips that where only the embedding is wanted."""
        if self.stem_proj is None or not with_stem:
            tokens, stem_map = self.forward_features(images), None  # (B, 1 + N, W)
        else:
            tokens, stem_map = self._features_and_stem_map(images)  # (B, 1 + N, W), (B, C, 2h, 2w)
        pooled = self.trunk.forward_head(tokens, pre_logits=True)  # (B, W)
        if stem_map is not None:
            # A 2x2 block per patch token rather than one token per pixel: the decoder's memory keeps its length
            # (1 + 16 in tiny, not 1 + 16 + 64), so cross-attention costs what it did; README, Results.
            fine = self.stem_proj(F.pixel_unshuffle(stem_map, 2).flatten(2).transpose(1, 2))  # (B, N, W)
            prefix = self.trunk.num_prefix_tokens
            tokens = torch.cat([tokens[:, :prefix], tokens[:, prefix:] + fine], dim=1)  # (B, 1 + N, W)
        return self.proj(pooled), tokens
