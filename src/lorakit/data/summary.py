"""The dataset summary a dry run prints: per dataset and subset the resolved settings, image counts, the bucket
table and the batches per epoch (counted as sd-scripts' `BaseDataset.make_buckets` does)."""

from __future__ import annotations

from dataclasses import fields
from typing import Mapping, Sequence

from lorakit.data.buckets import batches_per_epoch
from lorakit.data.config import DEFAULTS, SubsetSettings
from lorakit.data.records import DatasetRecords

Size = tuple[int, int]

# Shown for every subset; every other setting only when it differs from its default.
_ALWAYS = ("num_repeats", "caption_extension", "class_tokens")
_IDENTITY = ("table", "kind", "image_dir", "metadata_file", "conditioning_data_dir", "is_reg")


def dataset_summary(datasets: Sequence[DatasetRecords], buckets: Sequence[Mapping[Size, int]]) -> str:
    """A readable, multi-line summary. `buckets`: samples per bucket, one mapping per dataset, as training placed
    them (`TrainingData.bucket_counts`)."""
    lines = []
    total_batches = 0
    for dataset, counts in zip(datasets, buckets, strict=True):
        batches = batches_per_epoch(counts, dataset.settings.batch_size)
        total_batches += batches
        lines += _dataset_lines(dataset, counts, batches)
    lines.append(f"total: {total_batches} batches per epoch")
    return "\n".join(lines)


def _dataset_lines(dataset: DatasetRecords, counts: Mapping[Size, int], batches: int) -> list[str]:
    settings = dataset.settings
    width, height = settings.resolution
    if not settings.enable_bucket:
        bucketing = "buckets off"
    elif settings.bucket_no_upscale:
        bucketing = f"buckets per image without upscaling (step {settings.bucket_reso_steps})"
    else:
        bucketing = (f"buckets {settings.min_bucket_reso}..{settings.max_bucket_reso} "
                     f"step {settings.bucket_reso_steps}")
    lines = [
        f"{settings.table} ({settings.source}, {settings.kind}): resolution {width}x{height}, "
        f"batch size {settings.batch_size}, {bucketing}"
        + (f", resize_interpolation {settings.resize_interpolation}" if settings.resize_interpolation else "")
        + (f", network_multiplier {settings.network_multiplier:g}" if settings.network_multiplier != 1 else "")
    ]
    for subset in settings.subsets:
        lines.append("  " + _subset_line(subset, dataset))
    lines.append(
        f"  images: {dataset.train_samples} training samples "
        f"({sum(1 for r in dataset.train if not r.is_reg)} images), "
        f"{dataset.reg_samples} regularisation samples ({sum(1 for r in dataset.train if r.is_reg)} of "
        f"{dataset.reg_images} images used), {len(dataset.validation)} validation images"
    )
    table = ", ".join(f"{w}x{h}: {count}" for (w, h), count in sorted(counts.items()))
    lines.append(f"  buckets ({len(counts)}): {table}")
    lines.append(f"  batches per epoch: {batches}")
    return lines


def _subset_line(subset: SubsetSettings, dataset: DatasetRecords) -> str:
    where = subset.metadata_file if subset.kind == "fine_tuning" else subset.image_dir
    train = [r for r in dataset.train if r.subset is subset]
    validation = sum(1 for r in dataset.validation if r.subset is subset)
    if subset.is_reg:
        samples = sum(r.num_repeats for r in train)
        counts = f"regularisation: {len(train)} images used, {samples} samples after balancing"
    else:
        counts = f"{len(train)} images x {subset.num_repeats} = {len(train) * subset.num_repeats} samples"
        if subset.validation_split:
            counts += f", {validation} validation (split {subset.validation_split:g}, seed {subset.validation_seed})"
    settings = []
    for name, value in _by_key(subset).items():
        if name in _IDENTITY or name in ("validation_split", "validation_seed"):
            continue
        if name in _ALWAYS or value != DEFAULTS.get(name):
            settings.append(f"{name}={value!r}" if isinstance(value, str) else f"{name}={_plain(value)}")
    mask = f", masks '{subset.conditioning_data_dir}'" if subset.conditioning_data_dir else ""
    return f"{subset.table} '{where}'{mask}: {counts}; " + ", ".join(settings)


def _by_key(subset: SubsetSettings) -> dict[str, object]:
    """The subset's resolved values by dataset key, its caption options in their place."""
    values: dict[str, object] = {}
    for field in fields(subset):
        value = getattr(subset, field.name)
        if field.name == "captions":
            values |= {option.name: getattr(value, option.name) for option in fields(value)}
        else:
            values[field.name] = value
    return values


def _plain(value: object) -> str:
    if isinstance(value, Mapping):
        return repr(dict(value))
    if isinstance(value, tuple):
        return repr(list(value))
    return str(value)
