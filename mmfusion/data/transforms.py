"""Image decoding and transforms.

Real-world image files come in every mode PIL knows: RGBA and palette images with transparency,
grayscale, CMYK JPEGs, 16-bit PNGs and phone photos rotated by an EXIF tag. :func:`load_image`
turns all of them into upright RGB so the model sees one kind of input.

The train transform takes an explicit ``random.Random`` instead of using torch's global RNG so
the augmentation of every sample is a pure function of (seed, epoch, worker, position): that is
what makes resuming a run at the exact sample reproduce the same batches.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from mmfusion.config import PreprocessConfig

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def load_image(source: bytes | str | Path | Image.Image) -> Image.Image:
    """Decode bytes, a path or a PIL image into an upright RGB image.

    Transparent pixels are composited onto white (what a viewer shows), not dropped to black.
    Raises ``PIL.UnidentifiedImageError``/``OSError`` for data that is not an image.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    image.load()  # decode now so truncated files fail here, inside the caller's error handling
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float32)
        peak = max(float(array.max()), 1.0)
        image = Image.fromarray((array * (255.0 / (65535.0 if peak > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


class ImageTransform:
    """Resize (shortest side), crop, and normalise a PIL image into a (3, S, S) float tensor.

    With ``train=True`` the crop is a random resized crop drawn from the ``rng`` passed per call;
    otherwise it is a centre crop. Flips are off unless asked for: captions name sides.
    """

    def __init__(
        self,
        image_size: int,
        preprocess: PreprocessConfig,
        train: bool = False,
        crop_scale_min: float = 0.8,
        hflip: bool = False,
    ):
        self.image_size = image_size
        self.interpolation = _INTERPOLATION[preprocess.interpolation]
        self.mean = torch.tensor(preprocess.mean).view(3, 1, 1)
        self.std = torch.tensor(preprocess.std).view(3, 1, 1)
        self.train = train
        self.crop_scale_min = crop_scale_min
        self.hflip = hflip

    def _random_crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(self.crop_scale_min, 1.0)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w = int(round((target * aspect) ** 0.5))
            h = int(round((target / aspect) ** 0.5))
            if 0 < w <= width and 0 < h <= height:
                x0 = rng.randint(0, width - w)
                y0 = rng.randint(0, height - h)
                return x0, y0, x0 + w, y0 + h
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        size = self.image_size
        if self.train:
            if rng is None:
                raise ValueError("the train transform needs an explicit rng for reproducible augmentation")
            box = self._random_crop_box(*image.size, rng)
            image = image.resize((size, size), self.interpolation, box=box)
            if self.hflip and rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            width, height = image.size
            if (width, height) != (size, size):
                scale = size / min(width, height)
                new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
                left, top = (new_w - size) // 2, (new_h - size) // 2
                image = image.resize((new_w, new_h), self.interpolation).crop((left, top, left + size, top + size))
        array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (S, S, 3)
        tensor = array.permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
        return (tensor - self.mean) / self.std


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) images in [-1, 1] (e.g. a decoder's output) -> RGB PIL images."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arrays]
