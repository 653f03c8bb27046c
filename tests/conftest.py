"""Shared fixtures: small synthetic shards built once per session, in a temporary folder."""

from __future__ import annotations

import pytest

from mmfusion.data.synthetic import ensure_synthetic_dataset

TINY = [  # a model small enough for CPU tests; same code paths as the shipped configs
    "model.vision.width=64", "model.vision.depth=2", "model.vision.heads=2", "model.text.width=64",
    "model.text.depth=2", "model.text.heads=2", "model.embed_dim=64",
    # The learning tests' thresholds were set on the patch stem; at width 64 the conv stem's first layers have 8
    # channels and learn a fixed batch too slowly for them. The conv stem has its own tests (test_models.py).
    "model.vision.stem=patch", "model.vision.patch_size=8",
    "model.fusion.stem_memory=false",  # tiny's fusion head folds in a conv stem's map, which the patch stem has not
]  # fmt: skip


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> dict[str, str]:
    """{"train": pattern, "val": pattern} of a 1200/200-sample synthetic dataset."""
    root = tmp_path_factory.mktemp("synthetic")
    return ensure_synthetic_dataset(root, n_train=1200, n_val=200, seed=0, image_size=64)


def tiny_overrides(synthetic: dict[str, str], *extra: str) -> list[str]:
    return [
        *TINY,
        f"data.train={synthetic['train']}",
        f"data.val={synthetic['val']}",
        "train.tensorboard=false",
        *extra,
    ]
