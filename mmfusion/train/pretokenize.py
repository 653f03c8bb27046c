"""Pre-tokenized training shards for the generator stage: every image is encoded once, not once per step.

Why: stage 2 of ``text_to_image`` freezes the image tokenizer, so an image's tokens never change while the
generator trains. Decoding each PNG and encoding it again on every visit cost more than half of a generator step on
2 CPU cores (tiny-gen: 0.43 s per step of 64 on the fly, ~0.2 s on cached tokens); encoding the 20k synthetic
training images once takes about a minute, and the freed time buys the generator twice the steps.

What is given up: training-time image augmentation. Every image is encoded through the deterministic (eval)
transform. The text-to-image configs do not augment anyway (a crop or a flip would move an object away from the
position its caption names); ``train.pretokenize=false`` encodes on the fly, with augmentation.

The cache, ``<stage run>/tokens/``: shards of ``<key>.tokens.npy`` (the (h, w) ids) + ``<key>.txt`` (+ ``.json``)
and ``manifest.json`` (source shards, tokenizer checkpoint, counts). It is built in a temporary folder and renamed
into place, so an interrupted run never leaves a partial cache; a resumed run reuses a complete one made from the
same shards by the same tokenizer checkpoint, and rebuilds any other. Bad samples are skipped and counted, as in
training.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from mmfusion.config import RunConfig
from mmfusion.data import ImageTransform, ShardError, ShardStream, count_samples
from mmfusion.data.shards import TOKENS_MEMBER, encode_tokens
from mmfusion.data.writer import ShardWriter
from mmfusion.models.text_to_image import ImageTokenizerModel
from mmfusion.train import checkpoint as ckpt_io

log = logging.getLogger(__name__)
CACHE_DIR = "tokens"
MANIFEST = "manifest.json"


def _identity(captions: list[str]) -> list[str]:
    return captions  # the captions are copied as text; the generator's own text tokenizer reads them later


def _reusable_manifest(cache: Path, wanted: dict) -> dict | None:
    """The cache's manifest when it was built from ``wanted``'s sources by its tokenizer, else None."""
    try:
        found = json.loads((cache / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return found if all(found.get(k) == v for k, v in wanted.items()) else None


@torch.no_grad()
def pretokenize_shards(
    cfg: RunConfig,
    urls: list[str],
    run_dir: str | Path,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
    progress: bool = True,
) -> tuple[list[str], dict]:
    """Encode the images of shards ``urls`` with the tokenizer at ``cfg.model.tokenizer_checkpoint``.

    Returns the token shards' paths under ``run_dir/tokens`` and the manifest (``samples``, ``skipped_samples``,
    ``sources``, ``tokenizer``); reuses the cache when its manifest names the same sources and tokenizer.
    """
    cache = Path(run_dir) / CACHE_DIR
    tokenizer_ckpt = ckpt_io.find_checkpoint(cfg.model.tokenizer_checkpoint)
    wanted = {"format": 1, "sources": list(urls), "tokenizer": str(tokenizer_ckpt.resolve()), "member": TOKENS_MEMBER}
    if (manifest := _reusable_manifest(cache, wanted)) is not None:
        return [str(p) for p in sorted(cache.glob("*.tar"))], manifest

    holder = ImageTokenizerModel(cfg.model)
    ckpt_io.load_submodule(tokenizer_ckpt, holder, "tokenizer")
    tokenizer = holder.tokenizer.to(device).eval()
    transform = ImageTransform(cfg.model.vision.image_size, cfg.model.preprocess)
    batch_size = 4 * cfg.train.batch_size  # no gradients: larger batches are cheaper per image
    stream = ShardStream(urls, batch_size, transform, _identity, train=False)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for stale in Path(run_dir).glob(f".{CACHE_DIR}-partial-*"):  # from a run killed (SIGKILL, SIGTERM) mid-pass
        shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{CACHE_DIR}-partial-"))
    samples = skipped = 0
    try:
        total = count_samples(urls)  # for the progress bar only
    except ShardError:  # remote shards cannot be counted from tar headers
        total = None
    try:
        with (
            ShardWriter(partial) as writer,
            tqdm(total=total, unit="img", desc="tokenizing images", disable=not progress, dynamic_ncols=True) as bar,
        ):
            for batch in stream:
                skipped += batch["skipped"]
                if not batch["key"]:
                    continue
                with autocast or nullcontext():
                    ids = tokenizer.encode(batch["image"].to(device))  # (B, h, w)
                for key, caption, meta, tokens in zip(batch["key"], batch["caption"], batch["json"], ids, strict=True):
                    sample = {"__key__": key, TOKENS_MEMBER: encode_tokens(tokens)}
                    writer.write({**sample, "txt": caption.encode(), "json": meta.encode()})
                samples += len(batch["key"])
                bar.update(len(batch["key"]) + batch["skipped"])
        if not samples:  # say which data is unusable, before the generator's stream finds nothing to read
            names = ", ".join(urls[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
            raise ShardError(f"no usable sample (image + caption) in {names}; {skipped} bad samples skipped")
        manifest = {**wanted, "samples": samples, "skipped_samples": skipped}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if cache.exists():  # a cache of other sources or another tokenizer
            shutil.rmtree(cache)
        partial.rename(cache)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if skipped:
        log.warning("pre-tokenizing skipped %d bad samples (of %d)", skipped, samples + skipped)
    log.info("pre-tokenized %d images into %s", samples, cache)
    return [str(p) for p in sorted(cache.glob("*.tar"))], manifest
