"""Webdataset shards: expansion, counting, and an exactly resumable batch stream.

Shards follow the img2dataset/open_clip convention: ``<key>.jpg|jpeg|png|webp`` + ``<key>.txt``
(+ optional ``<key>.json``). Pre-tokenized shards (``mmfusion.train.pretokenize``) hold ``<key>.tokens.npy``,
an image's discrete tokens, in place of the image. Tar reading reuses webdataset's ``tarfile_samples`` (so ``pipe:`` and
URLs work through ``gopen``); the ordering, splitting and shuffling are ours because they have to
be replayable.

Exact-sample resume, the design: the stream of one (rank, worker) in epoch ``e`` is a pure function
of (seed, e, rank, worker): the shard order is a seeded permutation per epoch, the shuffle buffer
has its own seeded RNG, and augmentation is seeded per sample. Every batch carries the worker that
made it and that worker's position ``(epoch, raw index)`` after its last sample. Resuming replays
each worker's raw byte stream up to its recorded position *without decoding* (decoding is the cost;
reading local tar bytes is cheap) and continues from there, and the DataLoader's round-robin is
rotated so the worker whose batch was next comes first again.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmfusion.data.transforms import IMAGE_EXTENSIONS, ImageTransform, load_image

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """A shard pattern that matches nothing, or a file that is not a readable shard."""


def expand_shards(pattern: str) -> list[str]:
    """Expand ``{000..009}`` braces, ``::`` lists and ``*`` globs into a list of shard URLs.

    Local files must exist (a clear error names what is missing); ``pipe:`` and URLs are passed on.
    """
    if not pattern or not pattern.strip():
        raise ShardError("empty shard pattern")
    urls: list[str] = []
    for item in wds.shardlists.expand_urls(pattern):
        if _is_remote(item):
            urls.append(item)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise ShardError(f"shard pattern '{item}' matches no file")
            urls.extend(matches)
        else:
            urls.append(os.path.expanduser(item))
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardError(f"shard pattern '{pattern}': no such file '{missing[0]}'{more}")
    return urls


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+]*://", url) is not None


def count_samples(urls: list[str]) -> int:
    """Count samples with an image (or, in pre-tokenized shards, image tokens) in local shards from tar headers."""
    total = 0
    for url in urls:
        if _is_remote(url):
            raise ShardError(f"cannot count samples of remote shard '{url}'; set data.train_samples")
        keys = set()
        try:
            with tarfile.open(url, "r") as tar:
                for member in tar:
                    folder, base = os.path.split(member.name)
                    stem, _, ext = base.partition(".")  # the key ends at the first dot, as webdataset splits it
                    if ext.lower() in IMAGE_EXTENSIONS or ext == TOKENS_MEMBER:
                        keys.add(os.path.join(folder, stem))
        except (tarfile.TarError, OSError) as exn:
            log.warning("counting %s stopped early: %s", url, exn)
        total += len(keys)
    return total


def caption_token_counts(
    urls: list[str],
    tokenizer: Callable[[list[str]], torch.Tensor],
    vocab_size: int,
    max_samples: int = 5000,
    pad_id: int = 0,
) -> torch.Tensor:
    """How often each token id (V,) occurs in the captions (``.txt``) of the first ``max_samples`` samples of
    ``urls``, in shard order; padding (``pad_id``, 0 for open_clip's tokenizer) is not counted. Unreadable shard
    data (logged) and samples without a readable caption are skipped.

    Reads through webdataset like the training stream (``pipe:`` and URLs too), but decodes captions only.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    errors = _ErrorCounter()
    captions: list[str] = []
    for raw in wds.tariterators.tarfile_samples([{"url": u} for u in urls], handler=errors):
        try:
            captions.append(raw["txt"].decode("utf-8").strip())
        except (KeyError, UnicodeDecodeError):
            continue
        if len(captions) >= max_samples:
            break
    for i in range(0, len(captions), 1000):
        ids = tokenizer(captions[i : i + 1000])
        counts += torch.bincount(ids[ids != pad_id], minlength=vocab_size)[:vocab_size]
    return counts


@dataclass
class Sample:
    key: str
    image: torch.Tensor  # (3, S, S) pixels, or (h, w) token ids from a pre-tokenized shard
    text: str
    json: str
    url: str  # the shard it came from: lets an index re-read the image (e.g. to rerank)
    audio: torch.Tensor | None = None  # (n_mels, frames) log-mel, when the sample has audio and it is wanted


AUDIO_EXTENSIONS = ("flac", "wav")
TOKENS_MEMBER = "tokens.npy"


def encode_tokens(tokens: torch.Tensor) -> bytes:
    """An image's (h, w) token ids as ``.npy`` bytes (int32), the ``tokens.npy`` member of a pre-tokenized shard."""
    buffer = io.BytesIO()
    np.save(buffer, tokens.cpu().numpy().astype(np.int32), allow_pickle=False)
    return buffer.getvalue()


def decode_tokens(data: bytes) -> torch.Tensor:
    """(h, w) long token ids from ``tokens.npy`` bytes; never unpickles."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"expected an (h, w) integer array of tokens, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


class SampleDecoder:
    """Decode one raw webdataset sample; returns None (never raises) for a corrupt or partial one.

    With an ``audio_transform``, a ``flac``/``wav`` member is decoded too; a sample without one is fine (its
    ``audio`` stays None), but one whose audio is corrupt or empty counts as a bad sample. With ``image_tokens``
    the sample's ``tokens.npy`` is read instead of an image (``transform`` is then unused).
    """

    def __init__(self, transform: ImageTransform, audio_transform: Callable | None = None, image_tokens: bool = False):
        self.transform = transform
        self.audio_transform = audio_transform
        self.image_tokens = image_tokens

    def __call__(self, raw: dict, rng: random.Random | None) -> Sample | None:
        key = raw.get("__key__", "?")
        try:
            wanted = (TOKENS_MEMBER,) if self.image_tokens else IMAGE_EXTENSIONS
            image_bytes = next((raw[ext] for ext in wanted if ext in raw), None)
            if image_bytes is None or "txt" not in raw:
                raise ValueError(f"missing {'tokens' if self.image_tokens else 'image'} or txt")
            text = raw["txt"].decode("utf-8").strip()
            if not text:
                raise ValueError("empty caption")
            if self.image_tokens:
                image = decode_tokens(image_bytes)
            else:
                image = self.transform(load_image(image_bytes), rng)
            meta = raw["json"].decode("utf-8") if "json" in raw else "{}"
            audio = None
            if self.audio_transform is not None:
                audio_bytes = next((raw[ext] for ext in AUDIO_EXTENSIONS if ext in raw), None)
                if audio_bytes is not None:
                    audio = self.audio_transform(audio_bytes, rng)
        except Exception as exn:  # any decoding failure is a bad sample, counted by the caller
            log.debug("skipping sample %s from %s: %s", key, raw.get("__url__"), exn)
            return None
        return Sample(key=key, image=image, text=text, json=meta, url=str(raw.get("__url__", "")), audio=audio)


class _ErrorCounter:
    """webdataset ``handler``: count and log tar-level errors (truncated shard, unreadable file), go on."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping unreadable shard data: %s", str(exn)[:300])
        return True


def _shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= bufsize:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Batches of decoded, tokenized samples from shards; infinite (training) or one pass (eval).

    Each batch is a dict: ``image`` (B, 3, S, S) (or, from pre-tokenized shards with ``image_tokens``,
    ``image_tokens`` (B, h, w)), ``text`` (B, L) token ids, ``caption``/``key``/``json`` lists, and
    bookkeeping: ``worker``, ``epoch``, ``pos`` (the producing worker's position after this batch) and
    ``skipped`` (bad samples since that worker's previous batch). With an
    ``audio_transform`` also ``audio`` (B, n_mels, frames), zeros where a sample has none, and
    ``has_audio`` (B,) bool.
    """

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        transform: ImageTransform,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        start: dict | None = None,
        audio_transform: Callable | None = None,
        image_tokens: bool = False,
    ):
        self.urls = urls
        self.batch_size = batch_size
        self.decoder = SampleDecoder(transform, audio_transform, image_tokens)
        self.tokenizer = tokenizer
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.start = start or {}  # {"rotation": int, "workers": {str(w): [epoch, pos]}}

    def _raw_epoch(self, epoch: int, worker: int, num_workers: int, errors: _ErrorCounter) -> Iterator[dict]:
        """The raw (undecoded) samples one worker reads in one epoch, in a replayable order."""
        urls = list(self.urls)
        if self.train:
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(urls)
        slots, slot = self.world_size * num_workers, self.rank * num_workers + worker
        if len(urls) >= slots:
            # Common case: whole shards per worker; ranks first so each rank's share is contiguous.
            mine = urls[self.rank :: self.world_size][worker::num_workers]
            raw = wds.tariterators.tarfile_samples([{"url": u} for u in mine], handler=errors)
        else:
            # Fewer shards than readers: every reader scans all shards and keeps every slots-th sample.
            raw = wds.tariterators.tarfile_samples([{"url": u} for u in urls], handler=errors)
            raw = (s for i, s in enumerate(raw) if i % slots == slot)
        if self.shuffle_buffer > 1:
            raw = _shuffled(raw, self.shuffle_buffer, random.Random(f"buf-{self.seed}-{epoch}-{self.rank}-{worker}"))
        return raw

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        # Rotate roles so that after a resume the worker whose batch was due next is asked first.
        worker = ((info.id if info else 0) + self.start.get("rotation", 0)) % num_workers
        epoch, skip = self.start.get("workers", {}).get(str(worker), (0, 0))
        errors = _ErrorCounter()
        reported_errors = 0
        pending: list[tuple[Sample, int]] = []
        while True:
            decoded = 0
            for pos, raw in enumerate(self._raw_epoch(epoch, worker, num_workers, errors)):
                if pos < skip:
                    continue
                rng = random.Random(f"aug-{self.seed}-{epoch}-{self.rank}-{worker}-{pos}") if self.train else None
                sample = self.decoder(raw, rng)
                if sample is None:
                    errors.count += 1
                    continue
                decoded += 1
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield self._collate(pending, worker, epoch, pos + 1, errors.count - reported_errors)
                    reported_errors, pending = errors.count, []
            if self.train and decoded == 0 and skip == 0:
                # An infinite stream over nothing usable would hang the run instead of failing it.
                raise ShardError(f"worker {worker} of rank {self.rank} read no usable sample in epoch {epoch}")
            skip = 0
            epoch += 1
            if not self.train:
                if pending or errors.count > reported_errors:  # an empty batch still reports its skips
                    yield self._collate(pending, worker, epoch, 0, errors.count - reported_errors)
                return

    def _collate(self, samples: list[Sample], worker: int, epoch: int, pos: int, skipped: int) -> dict:
        captions = [s.text for s in samples]
        if self.decoder.image_tokens:  # (B, h, w); an empty batch cannot know h, w
            images = {"image_tokens": torch.stack([s.image for s in samples]) if samples else torch.empty(0, 0, 0)}
        else:
            size = self.decoder.transform.image_size
            images = {"image": torch.stack([s.image for s in samples]) if samples else torch.empty(0, 3, size, size)}
        batch = {
            **images,  # (B, 3, S, S) pixels or (B, h, w) tokens
            "text": self.tokenizer(captions),  # (B, L)
            "caption": captions,
            "key": [s.key for s in samples],
            "url": [s.url for s in samples],
            "json": [s.json for s in samples],
            "worker": worker,
            "epoch": epoch,
            "pos": pos,
            "skipped": skipped,
        }
        if self.decoder.audio_transform is not None:
            shape = (self.decoder.audio_transform.cfg.n_mels, self.decoder.audio_transform.num_frames)
            mels = [s.audio if s.audio is not None else torch.zeros(shape) for s in samples]
            batch["audio"] = torch.stack(mels) if mels else torch.empty(0, *shape)  # (B, n_mels, frames)
            batch["has_audio"] = torch.tensor([s.audio is not None for s in samples], dtype=torch.bool)
        return batch


class StreamPosition:
    """Tracks, in the training process, where each worker's stream stands, for checkpoints."""

    def __init__(self, num_workers: int, start: dict | None = None):
        self.num_workers = max(1, num_workers)
        start = start or {}
        self.rotation = start.get("rotation", 0)
        self.workers = dict(start.get("workers", {}))
        self.batches = 0

    def update(self, batch: dict) -> None:
        self.workers[str(batch["worker"])] = [batch["epoch"], batch["pos"]]
        self.batches += 1

    def state(self) -> dict:
        return {"rotation": (self.rotation + self.batches) % self.num_workers, "workers": dict(self.workers)}


def make_loader(dataset: ShardStream, workers: int) -> DataLoader:
    """A DataLoader over a :class:`ShardStream` (which batches itself: ``batch_size=None``)."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
