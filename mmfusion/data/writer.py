"""Writing webdataset shards from a folder of captioned images or a csv/jsonl table (optionally with audio).

Every shard is written under a temporary name and renamed into place, so a crash never leaves a
half-written ``.tar`` that a later training run would read as truncated. Members carry mtime 0 and
uid/gid 0, so the same input gives byte-identical shards.

Inputs that cannot be used (not an image, a missing caption, a missing file, audio that is not a
decodable WAV/FLAC file) are skipped and returned in the report with the reason; they never stop the run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import soundfile as sf
from PIL import Image

from mmfusion.data.audio import load_audio

KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
FOLDER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_MEMBERS = {".wav": "wav", ".flac": "flac"}  # audio file suffix (any case) -> sample member name
# soundfile container names accepted under each member: WAVEX and RF64 are WAV variants that keep the .wav suffix.
AUDIO_FORMATS = {"wav": {"WAV", "WAVEX", "RF64"}, "flac": {"FLAC"}}


def add_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """Append one sample (``__key__`` + extension -> bytes) as ``<key>.<ext>`` members, in dict order.

    Fixed member metadata (mtime 0, root owner, no user names) makes the same samples byte-identical shards.
    """
    for ext, data in sample.items():
        if ext.startswith("__"):
            continue
        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write samples (dicts of extension -> bytes, plus ``__key__``) into numbered tar shards."""

    def __init__(self, out_dir: str | Path, prefix: str = "", samples_per_shard: int = 1000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: str | None = None
        self._count = 0

    def _open_next(self) -> None:
        fd, self._tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".partial-", suffix=".tar")
        os.close(fd)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out_dir / f"{self.prefix}{len(self.shards):06d}.tar"
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, final)
        self.shards.append(final)
        self._tar, self._tmp = None, None

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._open_next()
        add_sample(self._tar, sample)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._close_current()

    def close(self) -> list[Path]:
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._tar, self._tmp = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type else self.close()


class ShardItem(NamedTuple):
    """One input sample: image path, caption (None when missing), json metadata and an optional audio file."""

    path: Path
    caption: str | None
    meta: dict
    audio: Path | None = None


@dataclass
class ShardReport:
    written: int = 0
    shards: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def encode_image_file(path: Path) -> tuple[str, bytes]:
    """Validate an image file; keep jpg/png/webp bytes as they are, re-encode other formats as png."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # full decode: catches truncated files, not just bad headers
        fmt = image.format
        if fmt in KEEP_AS_IS:
            return KEEP_AS_IS[fmt], data
        buffer = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, format="PNG")
        return "png", buffer.getvalue()


def encode_audio_file(path: Path) -> tuple[str, bytes]:
    """Validate a WAV or FLAC file and return its member name (from the suffix) and its bytes, kept as they are.

    Raises ``OSError`` for a file that cannot be read, ``ValueError`` for another suffix, bytes soundfile cannot
    open or a container that does not match the suffix (a FLAC file named .wav would mislead readers that go by
    the member name), and :class:`~mmfusion.data.audio.AudioLoadError` for audio that does not decode in full,
    is empty or holds NaN/inf.
    """
    member = AUDIO_MEMBERS.get(path.suffix.lower())
    if member is None:
        raise ValueError(f"suffix {path.suffix!r} is not .wav or .flac")
    data = path.read_bytes()
    try:
        info = sf.info(io.BytesIO(data))  # header only
    except RuntimeError as err:  # soundfile's own message names the BytesIO object, not the file: keep its reason
        raise ValueError(f"soundfile cannot open it ({getattr(err, 'error_string', err)})") from None
    if info.format not in AUDIO_FORMATS[member]:
        raise ValueError(f"the file holds {info.format} audio but is named .{member}")
    # Full decode with the loader training uses, at the file's own rate so no time goes into resampling.
    load_audio(data, sample_rate=info.samplerate)
    return member, data


def folder_items(images_dir: str | Path) -> Iterator[ShardItem]:
    """(image path, caption from the sidecar .txt or None, metadata) for each image under a folder."""
    root = Path(images_dir)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file()):
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else None
        yield ShardItem(path, caption, {"path": str(path.relative_to(root))})


def _resolve(table: Path, cell: object) -> Path:
    """A path cell of ``table``, relative ones taken from the table's folder."""
    path = Path(str(cell))
    return path if path.is_absolute() else table.parent / path


def table_items(table: str | Path) -> Iterator[ShardItem]:
    """Rows of a csv (header with ``path`` and ``caption``) or jsonl table; relative paths are
    resolved against the table's folder; other columns go into the sample's json. An optional
    ``audio`` column names a WAV/FLAC file for the sample; an empty cell means no audio."""
    table = Path(table)
    if table.suffix.lower() == ".jsonl":
        with open(table, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(table, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not {"path", "caption"} <= set(row):
            found = ", ".join(map(str, row)) if isinstance(row, (dict, list)) else repr(row)
            raise ValueError(f"{table}: row {n} needs 'path' and 'caption' columns, found {found}")
    for row in rows:
        extra = {k: v for k, v in row.items() if k not in ("caption",)}
        caption = str(row["caption"]).strip() if row.get("caption") is not None else None
        # None: a jsonl null or a short csv row; "" or blanks: an empty cell. Both mean this sample has no audio.
        audio = row.get("audio")
        audio_path = _resolve(table, str(audio).strip()) if audio is not None and str(audio).strip() else None
        yield ShardItem(_resolve(table, row["path"]), caption, extra, audio_path)


def write_shards(
    items: Iterable[ShardItem | tuple], out_dir: str | Path, samples_per_shard: int = 1000, progress=None
) -> ShardReport:
    """Write (image path, caption, metadata[, audio path]) items into shards; unusable items are skipped and listed.

    Audio is stored as-is under ``wav`` or ``flac`` by its suffix; an item whose audio is unusable is skipped
    and listed under the audio file's path.
    """
    report = ShardReport()
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard) as writer:
        for item in items:
            path, caption, meta, audio = ShardItem(*item)  # plain 3-tuples (no audio) still work
            if progress is not None:
                progress.update(1)
            if not caption:
                report.skipped.append((str(path), "no caption"))
                continue
            try:
                ext, data = encode_image_file(path)
            except Exception as exn:  # unreadable or not an image: skip it, keep going
                report.skipped.append((str(path), f"not a readable image ({type(exn).__name__}: {exn})"))
                continue
            sample = {"__key__": f"{report.written:09d}", ext: data, "txt": caption.encode("utf-8")}
            if audio is not None:
                try:
                    audio_ext, audio_data = encode_audio_file(audio)
                except Exception as exn:  # missing, unreadable or not WAV/FLAC: skip the sample, keep going
                    report.skipped.append((str(audio), f"not a readable WAV/FLAC file ({type(exn).__name__}: {exn})"))
                    continue
                sample[audio_ext] = audio_data
            sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            writer.write(sample)
            report.written += 1
    report.shards = writer.shards
    return report


def save_image_grid(images: list, path: str | Path, columns: int | None = None, pad: int = 2) -> Path:
    """Tile PIL images (all the same size) into one PNG, written atomically (temporary file + rename)."""
    if not images:
        raise ValueError("no images to save")
    columns = columns or min(len(images), max(1, round(len(images) ** 0.5 + 0.5)))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync and ``os.replace``: a reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
