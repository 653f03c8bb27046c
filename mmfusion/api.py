"""The loaded model, for applications: ``mmfusion.load(path)`` and its ``encode_*`` methods.

A checkpoint alone rebuilds the model and its preprocessing offline: the weights are safetensors,
the config (preprocessing included) is JSON, nothing is unpickled and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from mmfusion.config import RunConfig, from_dict
from mmfusion.data import ImageTransform, ShardStream, expand_shards, load_image, make_loader
from mmfusion.eval.retrieval import evaluate
from mmfusion.models import CLIPModel, create_model, create_tokenizer
from mmfusion.train import checkpoint as ckpt_io
from mmfusion.train.dist import resolve_device

ImageInput = Image.Image | str | Path | bytes


class ImageLoadError(ValueError):
    """An input given as an image that cannot be decoded as one."""


class MMFusion:
    """A trained model with its tokenizer and preprocessing, ready to embed images and text.

    Embeddings are L2-normalised float32 CPU tensors of shape (N, ``embed_dim``); image and text
    embeddings live in one space, so ``encode_text(...) @ encode_image(...).T`` ranks images.
    """

    def __init__(self, model: CLIPModel, config: RunConfig, checkpoint: Path | None = None, device: str = "cpu"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.checkpoint = checkpoint
        self.tokenizer = create_tokenizer(config.model.text.context_length)
        self.transform = ImageTransform(config.model.vision.image_size, config.model.preprocess)
        self._fingerprint: str | None = None

    @property
    def embed_dim(self) -> int:
        return self.config.model.embed_dim

    @property
    def fingerprint(self) -> str:
        """Identifies the weights and config; an index built with one model refuses another."""
        if self._fingerprint is None:
            self._fingerprint = ckpt_io.fingerprint(self.checkpoint) if self.checkpoint else "untrained"
        return self._fingerprint

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image (PIL, path or encoded bytes) -> a normalised (3, S, S) tensor."""
        try:
            pil = load_image(image)
        except Exception as exn:
            name = image if isinstance(image, (str, Path)) else type(image).__name__
            raise ImageLoadError(f"{name}: not a readable image ({exn})") from None
        return self.transform(pil)

    @torch.no_grad()
    def encode_image(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        """Embed images given as PIL images, file paths or encoded bytes -> (N, E)."""
        if isinstance(images, (Image.Image, str, Path, bytes)):
            images = [images]
        out = []
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]]).to(self.device)
            out.append(self.model.encode_image(pixels).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Embed captions or queries -> (N, E). Texts longer than the context are truncated."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def evaluate(self, shards: str, batch_size: int = 128, workers: int = 1) -> dict[str, float]:
        """Held-out retrieval (and zero-shot) metrics on shards, as ``tools/eval.py`` prints them."""
        stream = ShardStream(expand_shards(shards), batch_size, self.transform, self.tokenizer, train=False)
        return evaluate(self.model, self.tokenizer, make_loader(stream, workers), self.device)


def load(path: str | Path, device: str = "cpu") -> MMFusion:
    """Load a run directory (its latest checkpoint) or a checkpoint directory."""
    ckpt = ckpt_io.find_checkpoint(path)
    state = ckpt_io.read_state(ckpt)
    config = from_dict(RunConfig, state["config"])
    model = create_model(config.model)
    ckpt_io.load_weights(ckpt, model)
    return MMFusion(model, config, ckpt, device)
