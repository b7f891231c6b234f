"""Training batches: records placed in buckets, each epoch's batch order, and the tensors of one batch.

Layers: records (discovery) → samples placed in buckets (`place_samples`) → the batches of an epoch
(`TrainingData.epoch_batches`, built on `buckets.make_batches`) → the tensors of one batch (`BatchLoader`).

Every random choice inside a batch (caption processing, flip, random crop, colour) comes from a generator seeded
by (seed, epoch, batch index, position), so a batch is the same whoever loads it — any DataLoader worker, any
process, before or after a resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lorakit.data.buckets import Size, batches_per_epoch, bucket_list, crop_condition, crop_offsets, interpolation_for
from lorakit.data.buckets import make_batches, place_image
from lorakit.data.captions import CaptionOptions, process_caption
from lorakit.data.images import load_image, load_mask
from lorakit.data.latent_cache import CachedLatents, LatentItem
from lorakit.data.records import DatasetRecords, ImageRecord
from lorakit.data.text_cache import CachedText, TextItem
from lorakit.data.transforms import image_tensor, mask_tensor
from lorakit.errors import LorakitError

# sd-scripts' colour augmentation: a third of the draws change colour, half of those by a hue shift of up to
# ±8 of OpenCV's 180 hue steps, the other half by a gamma in [0.95, 1.05].
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8 / 180
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class Sample:
    """A record placed in its bucket, with the settings its dataset gives it."""

    record: ImageRecord
    bucket: Size
    resized_size: Size
    interpolation: str
    batch_size: int

    def latent_item(self) -> LatentItem:
        return LatentItem(
            image_path=self.record.path,
            image_size=self.record.size,
            bucket=self.bucket,
            resized_size=self.resized_size,
            interpolation=self.interpolation,
            flip_aug=self.record.subset.flip_aug,
            alpha_mask=self.record.alpha_mask,
        )


def place_samples(dataset: DatasetRecords, records: Sequence[ImageRecord]) -> list[Sample]:
    """Each record's bucket, resized size and interpolation under its dataset's bucket settings.

    Without bucketing every image is resized to cover `resolution` and centre-cropped (sd-scripts does this only for
    cached latents and otherwise refuses images of another size).
    """
    settings = dataset.settings
    width, height = settings.resolution
    no_upscale = settings.enable_bucket and settings.bucket_no_upscale
    buckets = None if no_upscale else bucket_list(
        settings.resolution, settings.enable_bucket, settings.min_bucket_reso, settings.max_bucket_reso,
        settings.bucket_reso_steps,
    )
    samples = []
    for record in records:
        try:
            placement = place_image(record.size, buckets, width * height, settings.bucket_reso_steps)
        except LorakitError as error:
            raise LorakitError(f"{record.path}: {error}") from None
        choice = record.subset.resize_interpolation or settings.resize_interpolation
        samples.append(Sample(
            record=record,
            bucket=placement.bucket,
            resized_size=placement.resized_size,
            interpolation=interpolation_for(record.size, placement.resized_size, choice),
            batch_size=settings.batch_size,
        ))
    return samples


class TrainingData:
    """Every dataset's samples in buckets, and the batches of each epoch (datasets never share a batch)."""

    def __init__(self, datasets: Sequence[DatasetRecords], seed: int, validation: bool = False):
        self.seed = seed
        self.datasets = list(datasets)
        self.samples = [place_samples(d, d.validation if validation else d.train) for d in self.datasets]
        self.validation = validation

    def bucket_members(self, dataset_index: int) -> dict[Size, list[Sample]]:
        """Each bucket's samples with repeats (validation samples count once)."""
        members: dict[Size, list[Sample]] = {}
        for sample in self.samples[dataset_index]:
            repeats = 1 if self.validation else sample.record.num_repeats
            members.setdefault(sample.bucket, []).extend([sample] * repeats)
        return members

    def bucket_counts(self, dataset_index: int) -> dict[Size, int]:
        return {bucket: len(members) for bucket, members in self.bucket_members(dataset_index).items()}

    def epoch_batches(self, epoch: int) -> list[tuple[Sample, ...]]:
        """The batches of a 1-based epoch in training order: shuffled from (seed, epoch) alone."""
        batches = []
        for index, dataset in enumerate(self.datasets):
            for batch in make_batches(self.bucket_members(index), dataset.settings.batch_size,
                                      self.seed + index, epoch):
                batches.append(batch.items)
        random.Random(f"lorakit-datasets-{self.seed}-{epoch}").shuffle(batches)
        return batches

    def __len__(self) -> int:
        """Batches per epoch, counted without building them (every epoch has as many)."""
        return sum(batches_per_epoch(self.bucket_counts(i), dataset.settings.batch_size)
                   for i, dataset in enumerate(self.datasets))

    def all_samples(self) -> list[Sample]:
        return [sample for samples in self.samples for sample in samples]

    def images(self) -> int:
        return sum(len(samples) for samples in self.samples)


@dataclass
class TrainBatch:
    """The tensors of one batch. Latents are raw VAE samples (not yet times the latent scale)."""

    paths: list[Path]
    captions: list[str]
    time_ids: Tensor  # [B, 6]: original (h, w), crop (top, left), target (h, w)
    loss_weights: Tensor  # [B]
    preserve: Tensor  # [B] bool: differential output preservation (target = the base model's prediction)
    latents: Tensor | None = None  # [B, 4, h, w] when latents are cached
    pixels: Tensor | None = None  # [B, 3, H, W] in [-1, 1] otherwise
    masks: Tensor | None = None  # [B, 1, H, W] in [0, 1] with masked loss
    text: tuple[Tensor, ...] | None = None  # cached text conditioning of the processed captions (SDXL: context, pooled)


def item_rng(seed: int, epoch: int, batch_index: int, position: int) -> random.Random:
    return random.Random(f"lorakit-item-{seed}-{epoch}-{batch_index}-{position}")


def caption_options(record: ImageRecord) -> CaptionOptions:
    return record.subset.captions


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' weak colour augmentation (see the constants above)."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return image
    if rng.random() > 0.5:
        hsv = np.asarray(image.convert("HSV"), dtype=np.int16).copy()
        shift = round(rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT) * 256)
        hsv[..., 0] = (hsv[..., 0] + shift) % 256
        return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    gamma = rng.uniform(*GAMMA_RANGE)
    values = np.clip(np.asarray(image, dtype=np.float32) ** gamma, 0, 255).astype(np.uint8)
    return Image.fromarray(values, "RGB")


class BatchLoader(torch.utils.data.Dataset):
    """The tensors of an epoch's batches, one DataLoader item per batch."""

    def __init__(
        self,
        batches: Sequence[tuple[Sample, ...]],
        *,
        seed: int,
        epoch: int,
        step_of_batch: Callable[[int], int],
        max_train_steps: int,
        latents: Mapping[LatentItem, CachedLatents] | None = None,
        text: Mapping[TextItem, CachedText] | None = None,
        masked_loss: bool = False,
    ):
        self.batches = batches
        self.seed = seed
        self.epoch = epoch
        self.step_of_batch = step_of_batch
        self.max_train_steps = max_train_steps
        self.latents = latents
        self.text = text
        self.masked_loss = masked_loss

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, batch_index: int) -> TrainBatch:
        batch = self.batches[batch_index]
        items = [self._item(sample, item_rng(self.seed, self.epoch, batch_index, position),
                            self.step_of_batch(batch_index))
                 for position, sample in enumerate(batch)]
        masks = [item["mask"] for item in items]
        any_mask = self.masked_loss or any(m is not None for m in masks)
        return TrainBatch(
            paths=[sample.record.path for sample in batch],
            captions=[item["caption"] for item in items],
            time_ids=torch.tensor([item["time_ids"] for item in items], dtype=torch.float32),
            loss_weights=torch.tensor([sample.record.loss_weight for sample in batch]),
            preserve=torch.tensor([bool(sample.record.subset.custom_attributes.get("diff_output_preservation"))
                                   for sample in batch]),
            latents=torch.stack([item["latents"] for item in items]) if self.latents is not None else None,
            pixels=torch.stack([item["pixels"] for item in items]) if self.latents is None else None,
            masks=torch.stack([_mask_or_ones(m, item) for m, item in zip(masks, items)])[:, None]
            if any_mask else None,
            text=None if self.text is None else _stacked_text(
                [self.text[TextItem(sample.record.path, item["caption"])] for sample, item in zip(batch, items)]),
        )

    def _item(self, sample: Sample, rng: random.Random, step: int) -> dict:
        record = sample.record
        caption = process_caption(record.caption, caption_options(record), rng, self.epoch, step,
                                  self.max_train_steps)
        flip = record.subset.flip_aug and rng.random() < 0.5
        item: dict = {"caption": caption, "mask": None}
        if self.latents is not None:
            # By item, not path: an image in two datasets (two resolutions) has a cached latent in each bucket.
            cached = self.latents[sample.latent_item()]
            latents = cached.latents_flipped if flip else cached.latents
            left_top, resized = cached.crop_left_top, cached.resized_size
            item["latents"] = latents.float()
            if cached.alpha_mask is not None:
                item["mask"] = cached.alpha_mask.flip(-1) if flip else cached.alpha_mask
        else:
            resized = sample.resized_size
            left_top = crop_offsets(resized, sample.bucket, record.subset.random_crop, rng)
            image, alpha = load_image(record.path, with_alpha=record.alpha_mask)
            if record.subset.color_aug:
                image = color_augment(image, rng)
            args = (resized, sample.bucket, left_top, sample.interpolation, flip)
            item["pixels"] = image_tensor(image, *args)
            if alpha is not None:
                item["mask"] = mask_tensor(alpha, *args)
        if record.mask_path is not None:
            mask = mask_tensor(load_mask(record.mask_path), resized, sample.bucket, left_top, sample.interpolation,
                               flip)
            item["mask"] = mask if item["mask"] is None else item["mask"] * mask
        crop_top, crop_left = crop_condition(resized, sample.bucket, left_top, flip)
        width, height = record.size
        item["time_ids"] = [height, width, crop_top, crop_left, sample.bucket[1], sample.bucket[0]]
        item["bucket"] = sample.bucket
        return item


def _stacked_text(entries: Sequence[CachedText]) -> tuple[Tensor, ...]:
    return tuple(torch.stack(tensors).float() for tensors in zip(*(entry.outputs for entry in entries)))


def _mask_or_ones(mask: Tensor | None, item: dict) -> Tensor:
    if mask is not None:
        return mask
    width, height = item["bucket"]
    return torch.ones(height, width)

