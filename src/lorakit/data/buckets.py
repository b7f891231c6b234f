"""Aspect-ratio bucketing, as sd-scripts does it (`library/train_util.py`
`BucketManager`, `library/model_util.py` `make_bucket_resolutions`): the bucket list, the bucket of each
image, its resized size, the crop, the interpolation, and the per-epoch batches. Pure functions.

Sizes are (width, height) tuples, as in sd-scripts and PIL.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Mapping, NamedTuple, Sequence, TypeVar

from lorakit.errors import LorakitError

Size = tuple[int, int]
T = TypeVar("T")

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


class Placement(NamedTuple):
    """Where one image goes: the bucket it trains in and the size it is resized to before the crop."""

    bucket: Size
    resized_size: Size


def bucket_resolutions(max_reso: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """The predefined buckets for an area of max_reso (sd-scripts' `make_bucket_resolutions`), sorted.

    The square of the largest multiple of `step` whose square fits the area, then for every width from
    min_size to max_size in steps the tallest height (a multiple of step, at most max_size) that keeps the
    area, with both orientations.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // step) * step
    resolutions = {(side, side)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


def bucket_list(resolution: Size, enable_bucket: bool, min_size: int, max_size: int, step: int) -> list[Size]:
    """The buckets of a dataset: the predefined list, or the one bucket `resolution` without bucketing."""
    if not enable_bucket:
        return [resolution]
    return bucket_resolutions(resolution, min_size, max_size, step)


def bucket_for(image_size: Size, buckets: Sequence[Size]) -> Size:
    """The image's own size if it is a bucket, else the bucket with the closest aspect ratio (first on ties)."""
    if tuple(image_size) in set(buckets):
        return tuple(image_size)
    aspect = image_size[0] / image_size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def resized_size(image_size: Size, bucket: Size) -> Size:
    """The size that covers the bucket keeping the image's aspect ratio (one side equals the bucket's)."""
    width, height = image_size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def _round_to_step(x: float, step: int) -> int:
    rounded = int(x + 0.5)
    return rounded - rounded % step


def no_upscale_bucket(image_size: Size, max_area: int, step: int) -> Placement:
    """`bucket_no_upscale`: the image is only ever shrunk (to max_area when larger), and its bucket is the
    resized size floored to multiples of `step` (a crop, never padding)."""
    width, height = image_size
    aspect = width / height
    if width * height > max_area:
        scaled_width = math.sqrt(max_area * aspect)
        scaled_height = max_area / scaled_width
        # Round one side to the step and derive the other; keep whichever keeps the aspect ratio better.
        width_rounded = _round_to_step(scaled_width, step)
        height_for_width = _round_to_step(width_rounded / aspect, step)
        height_rounded = _round_to_step(scaled_height, step)
        width_for_height = _round_to_step(height_rounded * aspect, step)
        # A side rounded down to 0 (an extreme aspect ratio) is the worst choice, not a division by zero.
        error_by_width = abs(width_rounded / height_for_width - aspect) if height_for_width else math.inf
        error_by_height = abs(width_for_height / height_rounded - aspect) if height_rounded else math.inf
        if error_by_width < error_by_height:
            resized = (width_rounded, int(width_rounded / aspect + 0.5))
        else:
            resized = (int(height_rounded * aspect + 0.5), height_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    return Placement(bucket, resized)


def place_image(image_size: Size, buckets: Sequence[Size] | None, max_area: int, step: int) -> Placement:
    """The placement of one image: from the predefined `buckets`, or per image (`buckets=None`, which is
    `bucket_no_upscale`)."""
    if buckets is None:
        placement = no_upscale_bucket(image_size, max_area, step)
        if min(placement.bucket) < step:
            width, height = placement.resized_size
            raise LorakitError(
                f"image of {image_size[0]}x{image_size[1]} px (at most the resolution's area: {width}x{height}) has a "
                f"side below bucket_reso_steps={step}; expected at least one step on each side with "
                "bucket_no_upscale (crop or drop the image)"
            )
        return placement
    bucket = bucket_for(image_size, buckets)
    return Placement(bucket, resized_size(image_size, bucket))


def aspect_ratio_error(image_size: Size, bucket: Size) -> float:
    """Bucket aspect ratio minus image aspect ratio (sd-scripts' `ar_error`, whose mean goes into metadata)."""
    return bucket[0] / bucket[1] - image_size[0] / image_size[1]


def crop_offsets(resized: Size, bucket: Size, random_crop: bool, rng: random.Random | None = None) -> Size:
    """(left, top) of the bucket-sized window cut out of the resized image: centred, or uniformly random.

    Random offsets are drawn width first, then height, each from 0..excess inclusive (as sd-scripts).
    """
    excess_w, excess_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if excess_w < 0 or excess_h < 0:
        raise ValueError(f"resized size {resized} does not cover bucket {bucket}")
    if not random_crop:
        return excess_w // 2, excess_h // 2
    if rng is None:
        raise ValueError("random_crop needs an rng")
    left = rng.randint(0, excess_w) if excess_w else 0
    top = rng.randint(0, excess_h) if excess_h else 0
    return left, top


def crop_condition(resized: Size, bucket: Size, left_top: Size, flipped: bool) -> tuple[int, int]:
    """SDXL's crop conditioning (c_top, c_left): the pixels cut from the top and left of the resized image, as
    in the SDXL paper's Algorithm 1 (sd-scripts instead feeds the letterbox offset of a "fit" resize, a known
    slip). A horizontal flip mirrors the window, so the left cut becomes the right one."""
    left, top = left_top
    if flipped:
        left = resized[0] - bucket[0] - left
    return top, left


def interpolation_for(image_size: Size, resized: Size, choice: str | None = None) -> str:
    """The interpolation name used for a resize: the explicit choice, else `area` when shrinking (or keeping)
    both dimensions and `lanczos` otherwise (sd-scripts' rule)."""
    if choice is not None:
        if choice not in INTERPOLATIONS:
            raise LorakitError(
                f"resize_interpolation = {choice!r} is not known; expected one of {', '.join(INTERPOLATIONS)}"
            )
        return choice
    if image_size[0] >= resized[0] and image_size[1] >= resized[1]:
        return "area"
    return "lanczos"


@dataclass(frozen=True)
class Batch:
    """One training batch: items of one bucket."""

    bucket: Hashable
    items: tuple


def make_batches(bucket_members: Mapping[Hashable, Sequence[T]], batch_size: int, seed: int, epoch: int) -> list[Batch]:
    """Cut every bucket into batches (the last may be short), never mixing buckets, in an order shuffled from
    (seed, epoch) alone: the same arguments give the same batches, another epoch another order.

    `bucket_members` lists each bucket's items with repeats already included (an item that repeats N times
    appears N times). Buckets are visited in sorted order before shuffling, so the result does not depend on
    the mapping's insertion order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(f"lorakit-batches-{seed}-{epoch}")
    batches = []
    for bucket in sorted(bucket_members):
        members = list(bucket_members[bucket])
        rng.shuffle(members)
        batches.extend(Batch(bucket, tuple(members[i : i + batch_size])) for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


def batches_per_epoch(bucket_counts: Mapping[Hashable, int], batch_size: int) -> int:
    """Number of batches in an epoch (sd-scripts' `BaseDataset.make_buckets`): the sum over buckets of
    ceil(count / batch_size)."""
    return sum(math.ceil(count / batch_size) for count in bucket_counts.values())
