"""An image becomes a training tensor: resize to cover its bucket, cut the bucket-sized window, optionally
flip, scale to [-1, 1]. The same steps make alpha and loss masks. Pillow only (no OpenCV).

`area` (sd-scripts' default when shrinking, OpenCV INTER_AREA there) is Pillow's BOX filter here: both
average the source pixels each output pixel covers; they agree exactly for integer factors and within
rounding otherwise. When an `area` resize enlarges a side, OpenCV falls back to bilinear, and so does this.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lorakit.data.buckets import Size

RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
}


def resampling_filter(interpolation: str, image_size: Size, resized: Size) -> Image.Resampling:
    """The Pillow filter for a named interpolation (see the module note on `area`)."""
    if interpolation == "area":
        shrinking = image_size[0] >= resized[0] and image_size[1] >= resized[1]
        return Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return RESAMPLING[interpolation]


def resize_and_crop(image: Image.Image, resized: Size, bucket: Size, left_top: Size, interpolation: str) -> Image.Image:
    """Resize to `resized` (skipped when already that size) and cut the bucket window at (left, top)."""
    if image.size != tuple(resized):
        image = image.resize(tuple(resized), resampling_filter(interpolation, image.size, resized))
    left, top = left_top
    return image.crop((left, top, left + bucket[0], top + bucket[1]))


def image_tensor(
    image: Image.Image, resized: Size, bucket: Size, left_top: Size, interpolation: str, flip: bool = False
) -> torch.Tensor:
    """The bucket-sized RGB pixels of `image` as float32 [3, H, W] in [-1, 1]."""
    window = resize_and_crop(image.convert("RGB"), resized, bucket, left_top, interpolation)
    pixels = torch.from_numpy(np.asarray(window, dtype=np.uint8).copy()).permute(2, 0, 1)
    if flip:
        pixels = pixels.flip(-1)
    return pixels.to(torch.float32) / 127.5 - 1.0


def mask_tensor(
    mask: Image.Image, resized: Size, bucket: Size, left_top: Size, interpolation: str, flip: bool = False
) -> torch.Tensor:
    """A one-channel ("L") mask, e.g. the alpha channel, through the same resize, crop and flip, as float32
    [H, W] in [0, 1]."""
    window = resize_and_crop(mask, resized, bucket, left_top, interpolation)
    values = torch.from_numpy(np.asarray(window, dtype=np.uint8).copy())
    if flip:
        values = values.flip(-1)
    return values.to(torch.float32) / 255.0
