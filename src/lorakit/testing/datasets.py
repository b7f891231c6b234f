"""Small captioned synthetic datasets for tests, the demo and benchmarks: shapes on coloured backgrounds in
several aspect ratios, written as a DreamBooth folder with caption files plus a dataset TOML."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
SHAPES = ("circle", "square", "triangle")
DEFAULT_SIZES = ((96, 96), (128, 80), (80, 128))  # square, landscape, portrait


def draw_image(size: tuple[int, int], shape: str, colour: str, background: str) -> Image.Image:
    image = Image.new("RGB", size, COLOURS[background])
    draw = ImageDraw.Draw(image)
    width, height = size
    side = min(width, height) // 2
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=COLOURS[colour])
    return image


def write_image_folder(folder: str | Path, count: int = 6, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                       seed: int = 0, caption_extension: str = ".txt", trigger: str = "lkt style") -> list[Path]:
    """`count` images (cycling through `sizes`) with a caption file each: "<trigger>, a red circle, blue background"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        shape = rng.choice(SHAPES)
        colour, background = rng.sample(sorted(COLOURS), 2)
        path = folder / f"image_{index:03d}.png"
        draw_image(sizes[index % len(sizes)], shape, colour, background).save(path)
        path.with_suffix(caption_extension).write_text(f"{trigger}, a {colour} {shape}, {background} background\n")
        paths.append(path)
    return paths


def write_dataset_toml(path: str | Path, image_dir: str | Path, *, resolution: int = 96, batch_size: int = 1,
                       num_repeats: int = 1, caption_extension: str = ".txt", enable_bucket: bool = True,
                       extra_subset: str = "") -> Path:
    """A DreamBooth-style dataset TOML over `image_dir`, bucketing on (steps of 32 for small images)."""
    path = Path(path)
    path.write_text(
        "[general]\n"
        f"enable_bucket = {str(enable_bucket).lower()}\n"
        f"caption_extension = \"{caption_extension}\"\n"
        "\n[[datasets]]\n"
        f"resolution = {resolution}\n"
        f"batch_size = {batch_size}\n"
        "min_bucket_reso = 64\nmax_bucket_reso = 192\nbucket_reso_steps = 32\n"
        "\n  [[datasets.subsets]]\n"
        f"  image_dir = \"{Path(image_dir).as_posix()}\"\n"
        f"  num_repeats = {num_repeats}\n"
        f"{extra_subset}"
    )
    return path
