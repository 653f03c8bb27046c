"""Data: shards, the built-in synthetic dataset, image transforms."""

from __future__ import annotations

from mmfusion.config import DataConfig
from mmfusion.data.shards import (
    ShardError,
    ShardStream,
    StreamPosition,
    caption_token_counts,
    count_samples,
    expand_shards,
    make_loader,
)
from mmfusion.data.transforms import ImageTransform, load_image

__all__ = [
    "ImageTransform",
    "ShardError",
    "ShardStream",
    "StreamPosition",
    "caption_token_counts",
    "count_samples",
    "expand_shards",
    "load_image",
    "make_loader",
    "resolve_shards",
]


def resolve_shards(pattern: str, data: DataConfig, image_size: int, split: str) -> list[str]:
    """Shard URLs for a pattern; ``"synthetic"`` builds (or reuses) the built-in dataset's shards."""
    if pattern == "synthetic":
        from mmfusion.data.synthetic import ensure_synthetic_dataset

        patterns = ensure_synthetic_dataset(
            data.synthetic_dir,
            data.synthetic_train,
            data.synthetic_val,
            data.synthetic_seed,
            image_size,
            audio=data.synthetic_audio,
        )
        pattern = patterns[split]
    return expand_shards(pattern)
