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
from mmfusion.data.audio import audio_transform_for
from mmfusion.data.transforms import to_pil_images
from mmfusion.eval import EVALUATORS
from mmfusion.eval.text_to_image import generate_for_prompts
from mmfusion.models import CLIPModel, create_model, create_tokenizer
from mmfusion.models.fusion import rerank_score
from mmfusion.models.text import caption_text
from mmfusion.train import checkpoint as ckpt_io
from mmfusion.train.dist import resolve_device

ImageInput = Image.Image | str | Path | bytes
AudioInput = str | Path | bytes | torch.Tensor  # a WAV/FLAC file, its bytes, or a 16 kHz waveform (T,) / (C, T)


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
        self.audio_transform = audio_transform_for(config.model.audio) if config.model.audio.enabled else None
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
        images = _as_list(images)
        out = []
        for i in range(0, len(images), batch_size):
            out.append(self.model.encode_image(self._pixels(images[i : i + batch_size])).float().cpu())
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

    @torch.no_grad()
    def encode_audio(self, clips: AudioInput | Sequence[AudioInput], batch_size: int = 64) -> torch.Tensor:
        """Embed sound clips (WAV/FLAC paths or bytes, or waveform tensors at 16 kHz) -> (N, E), L2-normalised, in
        the same space as images and text. Clips are centre-cropped or padded to the trained duration. An input
        that cannot be decoded raises :class:`mmfusion.data.audio.AudioLoadError` naming it."""
        if self.audio_transform is None:
            raise ValueError("this model has no audio tower: train it with model.audio.enabled=true")
        if isinstance(clips, (str, Path, bytes)) or (isinstance(clips, torch.Tensor) and clips.dim() == 1):
            clips = [clips]
        out = []
        for i in range(0, len(clips), batch_size):
            mels = torch.stack([self.audio_transform(c) for c in clips[i : i + batch_size]]).to(self.device)
            out.append(self.model.encode_audio(mels).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @property
    def has_fusion(self) -> bool:
        """Whether the model has the fusion head (captioning, matching, reranking)."""
        return getattr(self.model, "fusion", None) is not None

    def _pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, S, S)

    @torch.no_grad()
    def match(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
        batch_size: int = 64,
        logits: bool = False,
    ) -> torch.Tensor:
        """Probability (N,) that image i and text i match, from the fusion head's matching classifier
        (its raw logits with ``logits=True``).

        One text is paired with every image (and one image with every text). Unlike ``encode_*`` similarities,
        the score reads image and text jointly, so it is sharper but costs one fused pass per pair: use it to
        rerank a short list (``SearchIndex.search(..., rerank=True)``), not to scan a collection.
        """
        images = _as_list(images)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(images) == 1 and len(texts) > 1:
            images = images * len(texts)
        if len(texts) == 1 and len(images) > 1:
            texts = texts * len(images)
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images and {len(texts)} texts")
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self._pixels(images[i : i + batch_size])
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            scores = self.model.match(pixels, tokens).float().cpu()
            out.append(scores if logits else scores.sigmoid())
        return torch.cat(out) if out else torch.empty(0)

    def rerank_scores(self, images: Sequence[ImageInput], text: str, similarities) -> torch.Tensor:
        """Scores (N,) that reorder contrastive candidates for one text query: the matching head's logit plus the
        contrastive logit (temperature x the given cosine ``similarities``); higher is better. Used by
        ``SearchIndex.search(..., rerank=True)``."""
        match_logits = self.match(images, text, logits=True) if len(images) else torch.empty(0)
        scale = self.model.logit_scale.detach().exp().item()
        return rerank_score(match_logits, torch.as_tensor(similarities, dtype=torch.float32), scale)

    @torch.no_grad()
    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        beam: int = 1,
        top_p: float | None = None,
        temperature: float = 1.0,
        max_length: int | None = None,
        min_length: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram: int = 4,
        length_penalty: float = 1.0,
        seed: int | None = None,
        batch_size: int = 32,
        audio: Sequence[AudioInput] | None = None,
    ) -> list[str]:
        """One caption per image. Greedy by default; ``beam=3`` for beam search, ``top_p=0.9`` for nucleus sampling
        (``seed`` makes it reproducible). Lengths count BPE tokens (at most the text context minus 1). By default
        no 4-gram repeats within a caption; ``repetition_penalty > 1`` also discourages repeated words.
        ``audio``: one clip per image, heard alongside it (models with an audio tower)."""
        images = _as_list(images)
        if audio is not None:
            if self.audio_transform is None:
                raise ValueError("this model has no audio tower: train it with model.audio.enabled=true")
            if len(audio) != len(images):
                raise ValueError(f"got {len(images)} images but {len(audio)} audio clips")
        generator = None
        if top_p is not None:
            generator = torch.Generator(self.device).manual_seed(seed if seed is not None else torch.seed())
        options = dict(
            beam=beam,
            top_p=top_p,
            temperature=temperature,
            min_new_tokens=min_length,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram=no_repeat_ngram,
            length_penalty=length_penalty,
            generator=generator,
        )
        if max_length is not None:
            options["max_new_tokens"] = max_length
        captions = []
        for i in range(0, len(images), batch_size):
            mels = None
            if audio is not None:
                mels = torch.stack([self.audio_transform(c) for c in audio[i : i + batch_size]]).to(self.device)
            ids = self.model.generate_captions(
                self._pixels(images[i : i + batch_size]),
                self.tokenizer.sot_token_id,
                self.tokenizer.eot_token_id,
                audio=mels,
                **options,
            )
            captions += [caption_text(self.tokenizer, t) for t in ids]
        return captions

    # ---- generation (models trained with a text_to_image recipe; tokenizing also works on stage 1 alone) ----
    def _require(self, attr: str, what: str):
        if not hasattr(self.model, attr):
            raise ValueError(f"this checkpoint has no {what} (model.kind={self.config.model.kind})")
        return getattr(self.model, attr)

    @torch.no_grad()
    def tokenize_image(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> discrete image tokens, a LongTensor (B, h, w)."""
        tokenizer = self._require("tokenizer", "image tokenizer")
        images = _as_list(images)
        return tokenizer.encode(self._pixels(images)).cpu()

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Image tokens (B, h, w) (or one grid (h, w)) -> decoded RGB PIL images."""
        tokenizer = self._require("tokenizer", "image tokenizer")
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() == 2:
            tokens = tokens[None]
        return to_pil_images(tokenizer.decode(tokens.to(self.device)))

    def check_prompt(self, prompt: str) -> None:
        """Raise ``ValueError`` for an empty prompt, one that is not valid Unicode (undecodable command-line bytes
        arrive as lone surrogates), or one longer than the text context (it would be cut)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the prompt is not valid UTF-8 text") from None
        n, context = len(self.tokenizer.encode(prompt)) + 2, self.config.model.text.context_length  # + start, end
        if n > context:
            raise ValueError(f"the prompt is {n} tokens, more than the model's {context}: {prompt[:60]!r}")

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        n: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        batch_size: int = 32,
    ) -> list[Image.Image]:
        """``n`` images per prompt (prompt-major order), decoded from tokens sampled by the generator with
        classifier-free ``guidance`` (1: none) from the ``top_k`` most probable codes (0: all); both default to the
        checkpoint's config. ``steps``: parallel steps of a masked generator (default 8; an autoregressive one takes
        one per token and refuses it). The same ``seed`` gives the same images."""
        self._require("generator", "text-to-image generator")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            self.check_prompt(p)
        if n < 1 or (steps is not None and steps < 1):
            raise ValueError("n and steps must be >= 1")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 draws from every code), got {top_k}")
        expanded = [p for p in prompts for _ in range(n)]
        return generate_for_prompts(
            self.model, self.tokenizer, expanded, self.device, seed if seed is not None else torch.seed(), batch_size,
            steps=steps, guidance=guidance, temperature=temperature, top_k=top_k,
        )  # fmt: skip

    def evaluate(self, shards: str, batch_size: int = 128, workers: int = 1, **extra) -> dict[str, float]:
        """Held-out metrics on shards, as ``tools/eval.py`` prints them: retrieval and zero-shot (plus fusion-head
        and audio metrics) for contrastive models; PSNR and codebook use for an image tokenizer; validation loss and
        generation metrics for text-to-image (``extra``: ``shape_classifier=``, ``clip=`` a contrastive model)."""
        stream = ShardStream(
            expand_shards(shards), batch_size, self.transform, self.tokenizer, train=False,
            audio_transform=self.audio_transform,
        )  # fmt: skip
        evaluator = EVALUATORS[self.config.model.kind]
        return evaluator(self.model, self.tokenizer, make_loader(stream, workers), self.device, **extra)


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    return [images] if isinstance(images, (Image.Image, str, Path, bytes)) else list(images)


def load(path: str | Path, device: str = "cpu") -> MMFusion:
    """Load a run directory (its latest checkpoint) or a checkpoint directory."""
    ckpt = ckpt_io.find_checkpoint(path)
    state = ckpt_io.read_state(ckpt)
    config = from_dict(RunConfig, state["config"])
    model = create_model(config.model)
    ckpt_io.load_weights(ckpt, model)
    return MMFusion(model, config, ckpt, device)
