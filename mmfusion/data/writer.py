"""Writing webdataset shards from a folder of captioned images or a csv/jsonl table.

Every shard is written under a temporary name and renamed into place, so a crash never leaves a
half-written ``.tar`` that a later training run would read as truncated. Members carry mtime 0 and
uid/gid 0, so the same input gives byte-identical shards.

Inputs that cannot be used (not an image, a missing caption, a missing file) are skipped and
returned in the report with the reason; they never stop the run.
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

from PIL import Image

KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
FOLDER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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


def folder_items(images_dir: str | Path) -> Iterator[tuple[Path, str | None, dict]]:
    """(image path, caption from the sidecar .txt or None, metadata) for each image under a folder."""
    root = Path(images_dir)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file()):
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else None
        yield path, caption, {"path": str(path.relative_to(root))}


def table_items(table: str | Path) -> Iterator[tuple[Path, str | None, dict]]:
    """Rows of a csv (header with ``path`` and ``caption``) or jsonl table; relative paths are
    resolved against the table's folder; other columns go into the sample's json."""
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
        path = Path(str(row["path"]))
        if not path.is_absolute():
            path = table.parent / path
        extra = {k: v for k, v in row.items() if k not in ("caption",)}
        yield path, (str(row["caption"]).strip() if row.get("caption") is not None else None), extra


def write_shards(
    items: Iterable[tuple[Path, str | None, dict]], out_dir: str | Path, samples_per_shard: int = 1000, progress=None
) -> ShardReport:
    """Write (image path, caption, metadata) items into shards; unusable items are skipped and listed."""
    report = ShardReport()
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard) as writer:
        for path, caption, meta in items:
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
            sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            writer.write(sample)
            report.written += 1
    report.shards = writer.shards
    return report
