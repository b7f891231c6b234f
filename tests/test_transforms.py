from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lorakit.data.transforms import image_tensor, mask_tensor, resampling_filter


def _gradient(width: int, height: int) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.arange(height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 255)], axis=-1), "RGB")


def test_crop_without_resize_is_the_exact_window_scaled_to_minus_one_one():
    image = _gradient(40, 30)
    tensor = image_tensor(image, (40, 30), (32, 16), (4, 7), "lanczos")
    assert tensor.shape == (3, 16, 32) and tensor.dtype == torch.float32
    expected_x = (torch.arange(4, 36, dtype=torch.float32) / 127.5 - 1.0)[None, :].expand(16, 32)
    expected_y = (torch.arange(7, 23, dtype=torch.float32) / 127.5 - 1.0)[:, None].expand(16, 32)
    assert torch.equal(tensor[0], expected_x)
    assert torch.equal(tensor[1], expected_y)
    assert torch.equal(tensor[2], torch.ones(16, 32))


def test_flip_mirrors_the_cropped_window():
    image = _gradient(40, 30)
    plain = image_tensor(image, (40, 30), (32, 16), (4, 7), "lanczos")
    flipped = image_tensor(image, (40, 30), (32, 16), (4, 7), "lanczos", flip=True)
    assert torch.equal(flipped, plain.flip(-1))


def test_area_is_an_exact_block_average_for_integer_factors():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    tensor = image_tensor(Image.fromarray(pixels, "RGB"), (12, 8), (12, 8), (0, 0), "area")
    blocks = pixels.reshape(8, 2, 12, 2, 3).astype(np.float64).mean(axis=(1, 3))
    expected = torch.from_numpy(np.round(blocks)).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.allclose(tensor, expected, atol=1 / 127.5 + 1e-6)


def test_area_enlarging_falls_back_to_bilinear():
    assert resampling_filter("area", (10, 10), (8, 8)) == Image.Resampling.BOX
    assert resampling_filter("area", (10, 10), (12, 8)) == Image.Resampling.BILINEAR
    assert resampling_filter("cubic", (10, 10), (8, 8)) == Image.Resampling.BICUBIC


def test_mask_goes_through_the_same_resize_crop_and_flip():
    mask = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1)), "L")
    values = mask_tensor(mask, (40, 30), (32, 16), (4, 7), "lanczos", flip=True)
    assert values.shape == (16, 32)
    assert torch.equal(values[0], (torch.arange(4, 36, dtype=torch.float32) * 6 / 255.0).flip(0))
