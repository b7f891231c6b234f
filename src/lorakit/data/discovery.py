"""Finding a dataset's images and captions on disk, as sd-scripts does (`library/train_util.py`,
`DreamBoothDataset` and `FineTuningDataset`), and turning them into records.

Three kinds of subset: DreamBooth (`image_dir` + caption files + `class_tokens`), fine-tuning (`metadata_file`,
JSON or JSONL) and masked-loss (`image_dir` + same-stem masks in `conditioning_data_dir`). Without a dataset
config, `--train_data_dir` holds `N_name` folders (N repeats, class tokens "name"), `--reg_data_dir` the same for
regularisation images, and `--in_json` makes a fine-tuning dataset.

Then: every image header is read before anything else (`images.preflight`), non-regularisation subsets are
split for validation (one seeded shuffle per subset, so training and validation never overlap; fine-tuning
subsets too, where sd-scripts validates on a copy of the training set), and
regularisation repeats are balanced against the training samples exactly as sd-scripts' `DreamBoothDataset` does.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from lorakit.data.config import (SDXL_BUCKET_STEP, DatasetSettings, SubsetSettings, load_dataset_settings,
                                 resolve_datasets)
from lorakit.data.images import IMAGE_EXTENSIONS, ImageHeader, list_images, preflight
from lorakit.data.records import DatasetRecords, ImageRecord
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_path, kind_of, read_text

logger = logging.getLogger(__name__)

CACHE_INFO_FILE = "metadata_cache.json"
FACE_CROP_TOKENS = 4  # `name_cx_cy_w_h.png`: the face-crop suffix sd-scripts strips to find the caption
MISSING_SHOWN = 5
MAX_SAMPLES_PER_EPOCH = 10_000_000  # images x repeats: each is an entry of the epoch's batch lists


# ---------------------------------------------------------------------------------------------------- entry points


def dataset_settings(command_line: Mapping[str, Any], bucket_multiple: int = SDXL_BUCKET_STEP) -> list[DatasetSettings]:
    """The resolved datasets: from `--dataset_config`, else from `--train_data_dir` / `--reg_data_dir` / `--in_json`."""
    config = command_line.get("dataset_config")
    if config:
        for flag in ("train_data_dir", "reg_data_dir", "in_json"):
            if command_line.get(flag):
                logger.warning("--%s is ignored because --dataset_config is given", flag)
        return load_dataset_settings(config, command_line, bucket_multiple)
    return resolve_datasets(command_line_config(command_line), command_line, source="command line",
                            bucket_multiple=bucket_multiple)


def load_datasets(command_line: Mapping[str, Any], bucket_multiple: int = SDXL_BUCKET_STEP) -> list[DatasetRecords]:
    """Resolve, discover, pre-flight, split and balance every dataset of the command line's configuration;
    `bucket_multiple` is what the model family's U-Net needs image sides to divide by."""
    prior_loss_weight = command_line.get("prior_loss_weight")
    return discover_datasets(dataset_settings(command_line, bucket_multiple),
                             prior_loss_weight=1.0 if prior_loss_weight is None else prior_loss_weight)


def discover_datasets(
    datasets: Sequence[DatasetSettings], *, prior_loss_weight: float = 1.0
) -> list[DatasetRecords]:
    """Records for every dataset; raises one LorakitError for the first problem (all unreadable images at once)."""
    found = [[discover_subset(subset, dataset.source) for subset in dataset.subsets] for dataset in datasets]
    paths = [item.path for subsets in found for items in subsets for item in items]
    paths += [item.mask_path for subsets in found for items in subsets for item in items if item.mask_path]
    headers = preflight(paths)
    for dataset, subsets in zip(datasets, found):
        for subset, items in zip(dataset.subsets, subsets):
            if subset.cache_info and subset.kind != "fine_tuning":
                _write_cache_info(subset, items, headers)
    return [
        _dataset_records(dataset, subsets, headers, prior_loss_weight) for dataset, subsets in zip(datasets, found)
    ]


def _dataset_records(
    dataset: DatasetSettings,
    found: Sequence[Sequence[FoundImage]],
    headers: Mapping[Path, ImageHeader],
    prior_loss_weight: float,
) -> DatasetRecords:
    train: list[ImageRecord] = []
    validation: list[ImageRecord] = []
    reg: list[ImageRecord] = []
    for subset, items in zip(dataset.subsets, found):
        records = [
            ImageRecord(
                path=item.path, caption=item.caption, size=_size(item, headers[item.path]), subset=subset,
                num_repeats=subset.num_repeats, is_reg=subset.is_reg,
                loss_weight=prior_loss_weight if subset.is_reg else 1.0, mask_path=item.mask_path,
                alpha_mask=subset.alpha_mask,
            )
            for item in items
        ]
        if subset.is_reg:
            reg.extend(records)
            continue
        kept, held_out = split_validation(records, subset.validation_split, subset.validation_seed)
        if subset.validation_split > 0 and not held_out:
            logger.warning("%s: %s: validation_split %g of %d images leaves no validation image",
                           dataset.source, subset.table, subset.validation_split, len(records))
        train.extend(kept)
        validation.extend(held_out)
    train_samples = sum(record.num_repeats for record in train)
    if train_samples > MAX_SAMPLES_PER_EPOCH:
        repeats = ", ".join(f"{s.table} num_repeats = {s.num_repeats}" for s in dataset.subsets)
        raise LorakitError(f"{dataset.source}: {dataset.table}: {train_samples:,} samples per epoch ({repeats}); "
                           f"expected at most {MAX_SAMPLES_PER_EPOCH:,}: lower num_repeats")
    if train_samples == 0:
        what = "only regularisation subsets (is_reg = true)" if reg else "no training images"
        raise LorakitError(f"{dataset.source}: {dataset.table}: {what}: the dataset would yield zero batches")
    balanced = balance_regularisation(train_samples, reg)
    return DatasetRecords(
        settings=dataset, train=tuple(train + balanced), validation=tuple(validation), reg_images=len(reg),
        reg_samples_before_balancing=sum(record.num_repeats for record in reg),
    )


def _size(item: FoundImage, header: ImageHeader) -> tuple[int, int]:
    """The header's size (EXIF-aware). Fine-tuning metadata's `image_size` is checked against it, not trusted:
    an image edited after the metadata was written keeps its true size."""
    if item.metadata_size is not None and item.metadata_size not in (header.size, header.stored_size):
        logger.warning("%s: image_size %s in the metadata differs from the file's size %s: using the file's",
                       item.path, list(item.metadata_size), list(header.size))
    return header.size


# ---------------------------------------------------------------------------------------------------- command line


def parse_repeats_folder(name: str) -> tuple[int, str] | None:
    """`10_sks dog` -> (10, "sks dog"); None for a folder without the `N_` prefix."""
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


def command_line_config(command_line: Mapping[str, Any]) -> dict[str, Any]:
    """A dataset config equivalent to the command line's dataset flags, so both paths resolve the same way."""
    train_dir = command_line.get("train_data_dir")
    reg_dir = command_line.get("reg_data_dir")
    if command_line.get("in_json"):
        subset: dict[str, Any] = {"metadata_file": str(command_line["in_json"])}
        if train_dir:
            subset["image_dir"] = str(train_dir)
        if reg_dir:
            logger.warning("--reg_data_dir is not used with --in_json (fine-tuning datasets have no regularisation)")
        return {"datasets": [{"subsets": [subset]}]}
    if not train_dir:
        raise LorakitError(
            "no dataset: pass --dataset_config, or --train_data_dir (a folder of N_name subfolders), or --in_json"
        )
    subsets = _repeat_folders(Path(train_dir), "--train_data_dir", is_reg=False)
    if reg_dir:
        subsets += _repeat_folders(Path(reg_dir), "--reg_data_dir", is_reg=True)
    return {"datasets": [{"subsets": subsets}]}


def _repeat_folders(parent: Path, flag: str, *, is_reg: bool) -> list[dict[str, Any]]:
    if kind_of(parent, flag) != "folder":
        raise LorakitError(f"{flag} {parent}: folder not found")
    subsets = []
    for folder in sorted(path for path in parent.iterdir() if path.is_dir()):
        parsed = parse_repeats_folder(folder.name)
        if parsed is None:
            logger.warning("%s: folder '%s' ignored: its name does not start with a repeat count (N_name)",
                           flag, folder.name)
            continue
        repeats, class_tokens = parsed
        subsets.append({"image_dir": str(folder), "num_repeats": repeats, "class_tokens": class_tokens,
                        "is_reg": is_reg})
    loose = list_images(parent)
    if loose and not subsets:
        raise LorakitError(
            f"{flag} {parent}: {len(loose)} images lie directly in it, but it must be the parent of N_name "
            f"subfolders, e.g. {parent / '10_sks dog'} holding the images (10 = repeats per epoch, "
            "'sks dog' = caption for images without a caption file)"
        )
    if loose:
        logger.warning("%s %s: %d images directly in it are not used (only N_name subfolders are)",
                       flag, parent, len(loose))
    if not subsets:
        raise LorakitError(f"{flag} {parent}: no N_name subfolders (e.g. '10_sks dog') found in it")
    return subsets


# ---------------------------------------------------------------------------------------------------- subsets


@dataclass(frozen=True)
class FoundImage:
    """An image found by a subset, before its header is read."""

    path: Path
    caption: str
    mask_path: Path | None = None
    metadata_size: tuple[int, int] | None = None


def discover_subset(subset: SubsetSettings, source: str = "") -> list[FoundImage]:
    """The images of one subset with their raw captions (and masks); `source` prefixes error messages."""
    where = f"{source}: {subset.table}" if source else subset.table
    if subset.kind == "fine_tuning":
        return _fine_tuning_subset(subset, where)
    items = _dreambooth_subset(subset, where)
    return _with_masks(subset, items, where) if subset.kind == "mask" else items


def _image_folder(folder: Path, where: str, key: str) -> list[Path]:
    if kind_of(folder, f"{where}: {key}") != "folder":
        raise LorakitError(f"{where}: {key} '{folder}' not found (relative paths start at {Path.cwd()})")
    images = list_images(folder)
    if not images:
        raise LorakitError(f"{where}: {key} '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def _dreambooth_subset(subset: SubsetSettings, where: str) -> list[FoundImage]:
    assert subset.image_dir is not None  # guaranteed by config resolution for DreamBooth and mask subsets
    images = _image_folder(subset.image_dir, where, "image_dir")
    cached = _read_cache_info(subset.image_dir) if subset.cache_info else {}
    items, missing = [], []
    for image in images:
        caption_file = caption_path(image, subset.caption_extension)
        caption = _fresh_cached_caption(cached, image, caption_file)
        if caption is None and caption_file is not None:
            caption = read_caption_file(caption_file, subset.captions.enable_wildcard)
        if caption is None:
            missing.append(image)
            caption = subset.class_tokens or ""
        items.append(FoundImage(image, caption))
    if missing:
        fallback = f"class_tokens '{subset.class_tokens}'" if subset.class_tokens else "an empty caption"
        shown = ", ".join(str(path) for path in missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        logger.warning("%s: %d images have no caption file (%s): using %s: %s%s",
                       where, len(missing), subset.caption_extension, fallback, shown, more)
    return items


def caption_path(image: Path, extension: str) -> Path | None:
    """The caption file of `image`: same stem + extension, else the stem without a face-crop `_cx_cy_w_h` suffix."""
    candidates = [image.with_name(image.stem + extension)]
    tokens = image.stem.split("_")
    if len(tokens) > FACE_CROP_TOKENS:
        candidates.append(image.with_name("_".join(tokens[:-FACE_CROP_TOKENS]) + extension))
    return next((path for path in candidates if path.is_file()), None)


def read_caption_file(path: Path, enable_wildcard: bool) -> str:
    """First line of a caption file, or all non-empty lines joined by newlines with `enable_wildcard`."""
    lines = read_text(path, "caption file").splitlines()
    if not lines:
        raise LorakitError(f"caption file {path} is empty: write a caption in it or delete it")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def _read_cache_info(image_dir: Path) -> dict[str, tuple[dict[str, Any], float]]:
    """`metadata_cache.json` ({abs image path: {"caption", "resolution"}}) with the file's mtime per entry;
    unreadable -> empty (it is rebuilt)."""
    path = image_dir / CACHE_INFO_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        mtime = path.stat().st_mtime
    except (OSError, ValueError, RecursionError):
        logger.warning("%s cannot be read: rebuilding it", path)
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: (value, mtime) for key, value in data.items() if isinstance(value, dict)}


def _fresh_cached_caption(
    cached: Mapping[str, tuple[dict[str, Any], float]], image: Path, caption_file: Path | None
) -> str | None:
    """A cached caption only when its caption file exists and neither it nor the image changed since."""
    entry = cached.get(str(image.absolute()))
    if entry is None or caption_file is None:
        return None
    value, mtime = entry
    caption = value.get("caption")
    newest = max(image.stat().st_mtime, caption_file.stat().st_mtime)
    return caption if isinstance(caption, str) and newest <= mtime else None


def _write_cache_info(subset: SubsetSettings, items: Sequence[FoundImage], headers: Mapping[Path, ImageHeader]) -> None:
    assert subset.image_dir is not None
    # sd-scripts' format and sizes (stored pixels, no EXIF), so sd-scripts can read the file lorakit writes.
    data = {
        str(item.path.absolute()): {"caption": item.caption, "resolution": list(headers[item.path].stored_size)}
        for item in items
    }
    path = subset.image_dir / CACHE_INFO_FILE
    try:
        if path.is_file() and json.loads(path.read_text(encoding="utf-8")) == data:
            return
    except (OSError, ValueError, RecursionError):  # unreadable: rewritten below
        pass
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _with_masks(subset: SubsetSettings, items: list[FoundImage], where: str) -> list[FoundImage]:
    """Pair every image with the same-stem mask in conditioning_data_dir; list every missing and extra one."""
    assert subset.conditioning_data_dir is not None
    masks = {path.stem: path for path in _image_folder(subset.conditioning_data_dir, where, "conditioning_data_dir")}
    stems = {item.path.stem for item in items}
    missing = [str(item.path.name) for item in items if item.path.stem not in masks]
    extra = [str(path.name) for stem, path in masks.items() if stem not in stems]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} images have no mask: {', '.join(missing[:20])}")
        if extra:
            parts.append(f"{len(extra)} masks have no image: {', '.join(extra[:20])}")
        raise LorakitError(
            f"{where}: conditioning_data_dir '{subset.conditioning_data_dir}' must hold one mask per image of "
            f"image_dir with the same file name stem; {'; '.join(parts)}"
        )
    return [replace(item, mask_path=masks[item.path.stem]) for item in items]


def _fine_tuning_subset(subset: SubsetSettings, where: str) -> list[FoundImage]:
    assert subset.metadata_file is not None
    metadata = read_metadata(subset.metadata_file, where)
    if not metadata:
        raise LorakitError(f"{where}: metadata_file '{subset.metadata_file}' lists no images")
    items, missing = [], []
    for key, entry in metadata.items():
        image = _metadata_image(key, subset.image_dir, f"{where}: metadata_file '{subset.metadata_file}': image key")
        if image is None:
            missing.append(key)
            continue
        size = entry.get("image_size")
        caption = metadata_caption(entry, subset.captions.caption_separator, subset.captions.enable_wildcard)
        items.append(FoundImage(image, caption,
                                metadata_size=tuple(size) if isinstance(size, list) and len(size) == 2 else None))
    if missing:
        folder = f" (image_dir '{subset.image_dir}')" if subset.image_dir else " (no image_dir set)"
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise LorakitError(f"{where}: metadata_file '{subset.metadata_file}': {len(missing)} images not found"
                           f"{folder}: {shown}")
    return items


def read_metadata(path: Path, where: str = "") -> dict[str, dict[str, Any]]:
    """Fine-tuning metadata: JSON `{image_key: {caption, tags, image_size}}` or JSONL lines with `image_path`."""
    prefix = f"{where}: " if where else ""
    if kind_of(path, f"{prefix}metadata_file") != "file":
        raise LorakitError(f"{prefix}metadata_file '{path}' not found")
    text = read_text(path, f"{prefix}metadata_file")
    if path.suffix.lower() == ".jsonl":
        metadata = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            entry = _json(line, path, number)
            if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str):
                raise LorakitError(f"{path} line {number}: expected an object with \"image_path\"")
            _check_entry(entry, path, f"line {number}")
            metadata[entry["image_path"]] = entry
        return metadata
    data = _json(text, path, None)
    if not isinstance(data, dict) or not all(isinstance(value, dict) for value in data.values()):
        raise LorakitError(f"{path}: expected an object {{image_key: {{\"caption\": ..., \"tags\": ...}}}}")
    for key, entry in data.items():
        _check_entry(entry, path, f"image {key!r}")
    return data


def _check_entry(entry: Mapping[str, Any], path: Path, where: str) -> None:
    for field in ("caption", "tags"):
        if entry.get(field) is not None and not isinstance(entry[field], str):
            raise LorakitError(f"{path}: {where}: \"{field}\" is {json.dumps(entry[field])[:60]}; expected a string")


def _json(text: str, path: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line}" if line else f"line {error.lineno}, column {error.colno}"
        raise LorakitError(f"{path}: invalid JSON at {where}: {error.msg}") from None
    except RecursionError:
        raise LorakitError(f"{path}: arrays or objects nested too deeply") from None


def metadata_caption(entry: Mapping[str, Any], separator: str, enable_wildcard: bool) -> str:
    """sd-scripts' caption of a metadata entry: `caption`, with `tags` appended after `caption_separator`
    (to every line with wildcards); `tags` alone when there is no caption."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        caption, tags = tags, None
    if enable_wildcard:
        if tags is not None and caption is not None:
            tags = tags.replace("\n", separator)
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
    elif tags:
        caption = f"{caption}{separator}{tags}"
    return caption or ""


def _metadata_image(key: str, image_dir: Path | None, what: str) -> Path | None:
    """The image a metadata key names: an existing path, a file in image_dir, or a stem in image_dir."""
    candidates = [Path(key)]
    if image_dir is not None:
        candidates += [image_dir / key] + [image_dir / (key + ext) for ext in IMAGE_EXTENSIONS]
    return next((path for path in candidates if kind_of(path, what) == "file"), None)


# ---------------------------------------------------------------------------------------------------- split, balance


def split_validation(
    records: Sequence[ImageRecord], split: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """One seeded shuffle: training keeps ceil(n * (1 - split)) images, validation the rest (repeats 1).

    Both lists keep the records' original order, so the split depends only on the seed and the file list.
    """
    if split <= 0:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    kept = sorted(order[: math.ceil(len(records) * (1 - split))])
    held_out = sorted(order[len(kept):])
    return [records[i] for i in kept], [replace(records[i], num_repeats=1) for i in held_out]


def balance_regularisation(train_samples: int, reg: Sequence[ImageRecord]) -> list[ImageRecord]:
    """sd-scripts' balancing (`DreamBoothDataset.__init__`): register reg images in order with their repeats until
    they reach the number of training samples; if they run out first, add one repeat per image in turn. Unused reg
    images are dropped."""
    if not reg:
        return []
    available = sum(record.num_repeats for record in reg)
    repeats: list[int] = []
    count = 0
    while count < train_samples:
        for index, record in enumerate(reg):
            if len(repeats) < len(reg) and index == len(repeats):
                repeats.append(record.num_repeats)
                count += record.num_repeats
            else:
                repeats[index] += 1
                count += 1
            if count >= train_samples:
                break
    if len(repeats) < len(reg):
        logger.warning("%d regularisation samples for %d training samples: %d of %d regularisation images are "
                       "not used", available, train_samples, len(reg) - len(repeats), len(reg))
    return [replace(record, num_repeats=n) for record, n in zip(reg, repeats)]
