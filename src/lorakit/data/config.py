"""The dataset config of sd-scripts (`--dataset_config` TOML or JSON): schema, validation and value resolution.

A config has `[general]`, `[[datasets]]` and `[[datasets.subsets]]` tables. Every value is resolved in the order
subset -> dataset -> general -> command line -> default (the first one that is set wins), so the result is a list
of fully resolved `DatasetSettings`, each with its `SubsetSettings`: nothing is left to inherit.

Differences from sd-scripts, all on the side of accepting more or explaining better:
- messages name the file, the table (`datasets[0].subsets[1]`), the key, what was expected and what was found,
  the keys allowed there and the closest one;
- integers are accepted where numbers are expected (`validation_split = 0`), and `resolution = "1024,768"` too;
- `validation_split` and `validation_seed` may be set per subset (sd-scripts' schema refuses them there).
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence, Union, get_args, get_origin

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr,
                      ValidationError)

from lorakit.config.flags import MAX_SIDE
from lorakit.config.train_config import TrainConfig
from lorakit.data.buckets import INTERPOLATIONS
from lorakit.data.captions import CaptionOptions
from lorakit.errors import LorakitError
from lorakit.fileio import kind_of, parse_json, parse_toml, read_text

logger = logging.getLogger(__name__)

DatasetKind = Literal["dreambooth", "fine_tuning", "mask"]
SDXL_BUCKET_STEP = 32  # SDXL's rule (sd-scripts): bucket sides divide by 8 * 4; a family may ask for another


def _parse_resolution(value: Any) -> Any:
    """`1024`, `[1024, 768]`, `"1024"` or `"1024,768"` -> (width, height); anything else is left for the type error."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if len(parts) in (1, 2) and all(part.isdigit() for part in parts):
            value = [int(part) for part in parts]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, list) and len(value) == 1:
        value = value * 2
    if isinstance(value, list) and len(value) == 2:
        return tuple(value)
    return value


def _parse_pair(value: Any) -> Any:
    """`[1.5, 3.0]` or the command line's `"1.5,3.0"` -> (1.5, 3.0)."""
    if isinstance(value, str):
        try:
            return tuple(float(part) for part in value.split(","))
        except ValueError:
            return value
    return tuple(value) if isinstance(value, list) else value


PositiveInt = Annotated[int, Strict(), Field(gt=0)]
Side = Annotated[int, Strict(), Field(gt=0, le=MAX_SIDE)]  # pixels
Resolution = Annotated[tuple[Side, Side], BeforeValidator(_parse_resolution)]
# Strict still accepts int: `0` is a valid float, `"0"` and `true` are not. TOML's nan and inf are refused.
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Probability = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
NonNegativeNumber = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(ge=0, lt=1, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Separator = Annotated[str, Strict(), Field(min_length=1)]
FileSuffix = Annotated[str, Strict(), Field(pattern=r"^[^/\\\x00]*$")]  # appended to an image's file name stem
CropRange = Annotated[tuple[Number, Number], BeforeValidator(_parse_pair)]
Interpolation = Literal[INTERPOLATIONS]  # type: ignore[valid-type]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubsetCommonTable(_Table):
    """Subset keys that may also be written in [[datasets]] or [general] ("ascendable" in sd-scripts)."""

    num_repeats: NonNegativeInt | None = None
    shuffle_caption: StrictBool | None = None
    caption_separator: Separator | None = None
    keep_tokens: NonNegativeInt | None = None
    keep_tokens_separator: StrictStr | None = None
    secondary_separator: Separator | None = None
    enable_wildcard: StrictBool | None = None
    caption_prefix: StrictStr | None = None
    caption_suffix: StrictStr | None = None
    caption_dropout_rate: Probability | None = None
    caption_dropout_every_n_epochs: NonNegativeInt | None = None
    caption_tag_dropout_rate: Probability | None = None
    token_warmup_min: NonNegativeInt | None = None
    token_warmup_step: NonNegativeNumber | None = None
    color_aug: StrictBool | None = None
    flip_aug: StrictBool | None = None
    random_crop: StrictBool | None = None
    face_crop_aug_range: CropRange | None = None
    custom_attributes: dict[str, Any] | None = None
    resize_interpolation: Interpolation | None = None
    caption_extension: FileSuffix | None = None
    class_tokens: StrictStr | None = None
    cache_info: StrictBool | None = None


class SubsetTable(SubsetCommonTable):
    """[[datasets.subsets]]."""

    image_dir: StrictStr | None = None
    is_reg: StrictBool | None = None
    alpha_mask: StrictBool | None = None
    metadata_file: StrictStr | None = None
    conditioning_data_dir: StrictStr | None = None
    validation_split: Fraction | None = None
    validation_seed: StrictInt | None = None


class DatasetCommonTable(SubsetCommonTable):
    """Keys of [[datasets]] and [general]."""

    resolution: Resolution | None = None
    batch_size: PositiveInt | None = None
    enable_bucket: StrictBool | None = None
    min_bucket_reso: Side | None = None
    max_bucket_reso: Side | None = None
    bucket_reso_steps: Side | None = None
    bucket_no_upscale: StrictBool | None = None
    validation_split: Fraction | None = None
    validation_seed: StrictInt | None = None
    network_multiplier: Number | None = None


class DatasetTable(DatasetCommonTable):
    subsets: list[Any] | None = None


class CommandLineValues(DatasetCommonTable):
    """The command-line fallbacks, under their config names."""

    alpha_mask: StrictBool | None = None


# Config key -> command-line flag where the names differ.
FLAG_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
# Options that only exist on the command line: written in a dataset config they get a pointed message.
COMMAND_LINE_ONLY = {
    "prior_loss_weight", "max_token_length", "debug_dataset", "masked_loss", "train_data_dir", "reg_data_dir",
    "in_json", "dataset_config", "seed", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs",
    "vae_batch_size", "caption_extention", *FLAG_NAMES.values(),
}

TOP_KEYS = ("general", "datasets")
SUBSET_KEYS = tuple(SubsetTable.model_fields)
DATASET_KEYS = tuple(DatasetTable.model_fields)
GENERAL_KEYS = tuple(DatasetCommonTable.model_fields)
SUBSET_ONLY_KEYS = tuple(key for key in SUBSET_KEYS if key not in DATASET_KEYS)
DATASET_ONLY_KEYS = tuple(key for key in GENERAL_KEYS if key not in SUBSET_KEYS)

# Effective defaults: sd-scripts' argparse defaults, which win over its dataclass defaults
# (`library/config_util.py`, `BlueprintGenerator.generate`), so they come from the flag table; the keys without a
# flag keep the dataclass defaults.
_NO_FLAG_DEFAULTS: dict[str, Any] = {"custom_attributes": {}, "class_tokens": None, "is_reg": False,
                                     "network_multiplier": 1.0}
DEFAULTS: dict[str, Any] = {
    key: _NO_FLAG_DEFAULTS[key] if key in _NO_FLAG_DEFAULTS else getattr(TrainConfig(), FLAG_NAMES.get(key, key))
    for key in (*GENERAL_KEYS, "alpha_mask", "is_reg")
}
CAPTION_KEYS = tuple(field.name for field in fields(CaptionOptions))


def default_caption_options(**changes: Any) -> CaptionOptions:
    """The caption options of a subset that sets none, with `changes` applied."""
    return CaptionOptions(**{key: DEFAULTS[key] for key in CAPTION_KEYS} | changes)


@dataclass(frozen=True)
class SubsetSettings:
    """One [[datasets.subsets]] table with every value resolved."""

    table: str  # where it was written, e.g. "datasets[0].subsets[1]" (for messages)
    kind: DatasetKind
    image_dir: Path | None
    metadata_file: Path | None
    conditioning_data_dir: Path | None
    is_reg: bool
    alpha_mask: bool
    num_repeats: int
    validation_split: float  # 0 for regularisation subsets: they are never split
    validation_seed: int  # validation_seed, else the run's --seed, else 0: the split is always reproducible
    captions: CaptionOptions
    color_aug: bool
    flip_aug: bool
    random_crop: bool
    face_crop_aug_range: tuple[float, float] | None
    custom_attributes: Mapping[str, Any]
    resize_interpolation: str | None  # None: area when shrinking, lanczos otherwise (`library/utils.py` `resize_image`)
    caption_extension: str
    class_tokens: str | None
    cache_info: bool


@dataclass(frozen=True)
class DatasetSettings:
    """One [[datasets]] table with every value resolved; `subsets` keeps only the subsets that will be used."""

    index: int
    source: str  # the config file, or "command line"
    kind: DatasetKind
    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    network_multiplier: float
    resize_interpolation: str | None
    subsets: tuple[SubsetSettings, ...]

    @property
    def table(self) -> str:
        return f"datasets[{self.index}]"


# ---------------------------------------------------------------------------------------------------- reading


def read_dataset_config(path: str | Path) -> dict[str, Any]:
    """Parse a `.toml` or `.json` dataset config into plain Python values."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise LorakitError(f"--dataset_config {path}: unsupported file type '{path.suffix}': expected .toml or .json")
    if kind_of(path, "--dataset_config") is None:
        raise LorakitError(f"--dataset_config {path}: file not found")
    text = read_text(path, "--dataset_config")
    data = parse_toml(text, path, "--dataset_config") if suffix == ".toml" else parse_json(text, path,
                                                                                            "--dataset_config")
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: expected a table/object at the top, found {_describe(data)}")
    return data


def load_dataset_settings(path: str | Path, command_line: Mapping[str, Any],
                          bucket_multiple: int = SDXL_BUCKET_STEP) -> list[DatasetSettings]:
    """Read and resolve a dataset config file against the command-line values."""
    return resolve_datasets(read_dataset_config(path), command_line, source=str(path),
                            bucket_multiple=bucket_multiple)


# ---------------------------------------------------------------------------------------------------- resolving


def resolve_datasets(
    config: Mapping[str, Any], command_line: Mapping[str, Any], *, source: str, bucket_multiple: int = SDXL_BUCKET_STEP
) -> list[DatasetSettings]:
    """Validate a parsed config and resolve every value of every dataset and subset.

    `command_line` maps flag names (`train_batch_size`, `resolution`, `masked_loss`, `seed`, ...) to their values;
    missing flags and None values fall through to the defaults. `bucket_multiple`: what the model family's U-Net
    needs image sides to divide by.
    """
    masked_loss = bool(command_line.get("masked_loss"))
    _check_keys(config, source, masked_loss)
    general = _validate(DatasetCommonTable, config.get("general", {}), source, "general")
    cli = _command_line_values(command_line)
    datasets_raw = config.get("datasets", [])
    if not isinstance(datasets_raw, list) or not datasets_raw:
        raise LorakitError(f"{source}: no [[datasets]] table: add at least one dataset with one [[datasets.subsets]]")
    datasets = []
    for index, raw in enumerate(datasets_raw):
        table = f"datasets[{index}]"
        dataset = _validate(DatasetTable, raw, source, table)
        subsets = [
            _validate(SubsetTable, subset, source, f"{table}.subsets[{sub}]")
            for sub, subset in enumerate(dataset.subsets or [])
        ]
        datasets.append(_resolve_dataset(index, source, dataset, subsets, general, cli, command_line,
                                         bucket_multiple))
    return datasets


def _resolve_dataset(
    index: int,
    source: str,
    dataset: DatasetTable,
    subsets: Sequence[SubsetTable],
    general: DatasetCommonTable,
    cli: CommandLineValues,
    command_line: Mapping[str, Any],
    bucket_multiple: int,
) -> DatasetSettings:
    table = f"datasets[{index}]"
    where = f"{source}: {table}"
    if not subsets:
        raise LorakitError(f"{where}: no [[datasets.subsets]]: add one with `image_dir` (or `metadata_file`)")

    def value(key: str, *tables: BaseModel) -> Any:
        for layer in (*tables, dataset, general, cli):
            found = getattr(layer, key, None)
            if found is not None:
                return found
        return DEFAULTS[key]

    kind = _dataset_kind(where, [f"{table}.subsets[{i}]" for i in range(len(subsets))], subsets)
    resolution = value("resolution")
    if resolution is None:
        raise LorakitError(
            f"{where}: resolution is required: set `resolution = 1024` (or [width, height]) in [general] or "
            "[[datasets]], or pass --resolution"
        )
    steps = value("bucket_reso_steps")
    if steps % bucket_multiple:
        raise LorakitError(
            f"{where}: bucket_reso_steps = {steps}: the model needs a multiple of {bucket_multiple} (e.g. 64)"
        )
    min_reso, max_reso = value("min_bucket_reso"), value("max_bucket_reso")
    enable_bucket, no_upscale = value("enable_bucket"), value("bucket_no_upscale")
    if enable_bucket and min(resolution) < steps:
        raise LorakitError(f"{where}: resolution {_size_text(resolution)} has a side below bucket_reso_steps "
                           f"{steps}; expected at least one step")
    if not enable_bucket and any(side % bucket_multiple for side in resolution):
        raise LorakitError(f"{where}: resolution {_size_text(resolution)} without bucketing is the size every image "
                           f"is trained at, so each side must be a multiple of {bucket_multiple} (what the model's "
                           "U-Net halves down to); e.g. 1024 or 1024,768, or enable_bucket = true")
    if enable_bucket and not no_upscale:
        min_reso, max_reso = _bucket_range(where, resolution, min_reso, max_reso, steps)
    elif enable_bucket:
        logger.warning("%s: bucket_no_upscale: min_bucket_reso and max_bucket_reso are not used", where)
    if value("network_multiplier") != 1:
        # sd-scripts accepts it too and never applies it; say so instead of training silently at 1.
        logger.warning("%s: network_multiplier = %g has no effect: the LoRA trains at multiplier 1 (as in sd-scripts)",
                       where, value("network_multiplier"))

    seed = command_line.get("seed")
    resolved: list[SubsetSettings] = []
    seen_dirs: dict[str, str] = {}
    for number, subset in enumerate(subsets):
        settings = _resolve_subset(f"{table}.subsets[{number}]", kind, subset, value, seed, source)
        if settings.num_repeats < 1:
            logger.warning("%s: %s: num_repeats is 0: subset ignored", source, settings.table)
            continue
        if settings.image_dir is not None and kind != "fine_tuning":
            key = str(settings.image_dir)
            if key in seen_dirs:
                logger.warning("%s: %s: same image_dir as %s in this dataset: subset ignored (as sd-scripts does)",
                               source, settings.table, seen_dirs[key])
                continue
            seen_dirs[key] = settings.table
        resolved.append(settings)
    return DatasetSettings(
        index=index, source=source, kind=kind, resolution=resolution, batch_size=value("batch_size"),
        enable_bucket=enable_bucket, min_bucket_reso=min_reso, max_bucket_reso=max_reso, bucket_reso_steps=steps,
        bucket_no_upscale=no_upscale, network_multiplier=value("network_multiplier"),
        resize_interpolation=value("resize_interpolation"), subsets=tuple(resolved),
    )


def _resolve_subset(
    table: str, kind: DatasetKind, subset: SubsetTable, value: Callable[..., Any], seed: int | None, source: str
) -> SubsetSettings:
    where = f"{source}: {table}"
    if kind != "fine_tuning" and subset.image_dir is None:
        raise LorakitError(
            f"{where}: image_dir is required: a {_KIND_NAMES[kind]} subset reads its images from "
            '`image_dir = "path/to/folder"` (a fine-tuning subset uses `metadata_file` instead)'
        )
    if kind != "dreambooth" and subset.is_reg:
        raise LorakitError(f"{where}: is_reg is only for DreamBooth subsets, not {_KIND_NAMES[kind]} subsets")
    random_crop = value("random_crop", subset)
    if kind == "mask" and random_crop:
        raise LorakitError(f"{where}: random_crop is not supported with conditioning_data_dir (mask subsets)")
    crop_range = value("face_crop_aug_range", subset)
    if crop_range is not None:
        raise LorakitError(f"{where}: not supported yet: face_crop_aug_range (face-centred crops from _cx_cy_w_h file "
                           "names are not implemented; crops follow the bucket)")
    extension = value("caption_extension", subset)
    if extension and not extension.startswith("."):
        extension = "." + extension
    validation_seed = value("validation_seed", subset)
    special = dict(
        table=table,
        kind=kind,
        image_dir=_path(subset.image_dir),
        metadata_file=_path(subset.metadata_file),
        conditioning_data_dir=_path(subset.conditioning_data_dir),
        is_reg=bool(subset.is_reg),
        validation_split=0.0 if subset.is_reg else float(value("validation_split", subset)),
        validation_seed=validation_seed if validation_seed is not None else (seed if seed is not None else 0),
        captions=CaptionOptions(**{key: value(key, subset) for key in CAPTION_KEYS}),
        random_crop=random_crop,
        face_crop_aug_range=crop_range,
        custom_attributes=MappingProxyType(dict(value("custom_attributes", subset))),
        caption_extension=extension,
    )
    # Every other field is its key's resolved value, by name.
    return SubsetSettings(**special, **{field.name: value(field.name, subset) for field in fields(SubsetSettings)
                                        if field.name not in special})


_KIND_NAMES = {"dreambooth": "DreamBooth", "fine_tuning": "fine-tuning", "mask": "masked-loss"}


def _dataset_kind(where: str, tables: Sequence[str], subsets: Sequence[SubsetTable]) -> DatasetKind:
    """DreamBooth (image_dir + caption files), fine-tuning (metadata_file) or mask (conditioning_data_dir)."""
    masks = [t for t, s in zip(tables, subsets) if s.conditioning_data_dir is not None]
    metadata = [t for t, s in zip(tables, subsets) if s.metadata_file is not None]
    plain = [t for t, s in zip(tables, subsets) if s.conditioning_data_dir is None and s.metadata_file is None]
    if masks and (metadata or plain):
        others = ", ".join(metadata + plain)
        raise LorakitError(
            f"{where}: mixes subsets with conditioning_data_dir ({', '.join(masks)}) and subsets without ({others}): "
            "put them in separate [[datasets]]"
        )
    if metadata and plain:
        raise LorakitError(
            f"{where}: mixes DreamBooth subsets (image_dir, caption files: {', '.join(plain)}) and fine-tuning "
            f"subsets (metadata_file: {', '.join(metadata)}): put them in separate [[datasets]]"
        )
    return "mask" if masks else "fine_tuning" if metadata else "dreambooth"


def _bucket_range(where: str, resolution, min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """Round min/max bucket sides to the step as sd-scripts does, and check they bracket the resolution."""
    if min_reso < steps:
        raise LorakitError(f"{where}: min_bucket_reso {min_reso} is smaller than bucket_reso_steps {steps}: bucket "
                           "sides are multiples of the step, so expected min_bucket_reso >= bucket_reso_steps")
    if min_reso % steps:
        rounded = min_reso - min_reso % steps
        logger.warning("%s: min_bucket_reso %d rounded down to %d (a multiple of bucket_reso_steps %d)",
                       where, min_reso, rounded, steps)
        min_reso = rounded
    if max_reso % steps:
        rounded = max_reso + steps - max_reso % steps
        logger.warning("%s: max_bucket_reso %d rounded up to %d (a multiple of bucket_reso_steps %d)",
                       where, max_reso, rounded, steps)
        max_reso = rounded
    if min(resolution) < min_reso:
        raise LorakitError(f"{where}: min_bucket_reso {min_reso} is larger than the resolution's smaller side "
                           f"{min(resolution)}: lower min_bucket_reso")
    if max(resolution) > max_reso:
        raise LorakitError(f"{where}: max_bucket_reso {max_reso} is smaller than the resolution's larger side "
                           f"{max(resolution)}: raise max_bucket_reso (SDXL users typically set 2048)")
    return min_reso, max_reso


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _command_line_values(command_line: Mapping[str, Any]) -> CommandLineValues:
    values = {}
    for key in CommandLineValues.model_fields:
        flag = FLAG_NAMES.get(key, key)
        if command_line.get(flag) is not None:
            values[key] = command_line[flag]
    if command_line.get("caption_extention") is not None:  # sd-scripts' misspelled alias wins
        values["caption_extension"] = command_line["caption_extention"]
    try:
        return CommandLineValues(**values)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        key = str(first["loc"][0])
        raise LorakitError(
            f"command line: --{FLAG_NAMES.get(key, key)}: {_problem(CommandLineValues, key, first)}"
        ) from None


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


# ---------------------------------------------------------------------------------------------------- messages


def _check_keys(config: Mapping[str, Any], source: str, masked_loss: bool) -> None:
    """Unknown keys and keys at the wrong level, with the message that says where they belong."""
    _check_level(config, TOP_KEYS, source, "the top level", "top")
    general = config.get("general", {})
    _expect_table(general, source, "general")
    _check_level(general, GENERAL_KEYS, source, "general", "general")
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list):
        raise LorakitError(
            f"{source}: `datasets` must be an array of tables ([[datasets]]), found {_describe(datasets)}"
        )
    for index, dataset in enumerate(datasets):
        table = f"datasets[{index}]"
        _expect_table(dataset, source, table)
        _check_level(dataset, DATASET_KEYS, source, table, "dataset")
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list):
            raise LorakitError(f"{source}: {table}: `subsets` must be an array of tables ([[datasets.subsets]]), "
                               f"found {_describe(subsets)}")
        for number, subset in enumerate(subsets):
            subset_table = f"{table}.subsets[{number}]"
            _expect_table(subset, source, subset_table)
            _check_level(subset, SUBSET_KEYS, source, subset_table, "subset")
            if "conditioning_data_dir" in subset and not masked_loss:
                raise LorakitError(
                    f"{source}: {subset_table}: conditioning_data_dir needs --masked_loss: without it the masks "
                    "would not be used; pass --masked_loss or remove the key"
                )


_LEVEL_NAMES = {"top": "the top level", "general": "[general]", "dataset": "[[datasets]]",
                "subset": "[[datasets.subsets]]"}


def _check_level(table: Mapping[str, Any], allowed: Sequence[str], source: str, path: str, level: str) -> None:
    for key in table:
        if key in allowed:
            continue
        where = source if level == "top" else f"{source}: {path}"
        raise LorakitError(f"{where}: {_misplaced(key, level) or _unknown(key, allowed, level)}")


def _misplaced(key: str, level: str) -> str | None:
    """The message for a known key written at the wrong level, or None for a key lorakit does not know."""
    if key in DATASET_ONLY_KEYS:
        return f"`{key}` is a dataset-level key: put it in [[datasets]] or [general], not in {_LEVEL_NAMES[level]}"
    if key in SUBSET_ONLY_KEYS:
        return f"`{key}` is a subset-level key: put it in [[datasets.subsets]], not in {_LEVEL_NAMES[level]}"
    if key == "subsets":
        return "`subsets` belongs inside a [[datasets]] table: write [[datasets.subsets]] after [[datasets]]"
    if key in TOP_KEYS:
        return f"`{key}` is a top-level table: write [{key}] or [[{key}]] at the top of the file"
    if key in FLAG_NAMES.values():
        config_key = next(name for name, flag in FLAG_NAMES.items() if flag == key)
        return f"`{key}` is the command-line name: in a dataset config write `{config_key}`"
    if key in COMMAND_LINE_ONLY:
        return f"`{key}` is a command-line option (--{key}), not a dataset-config key"
    return None


def _unknown(key: str, allowed: Sequence[str], level: str) -> str:
    known = sorted(set(allowed) | set(GENERAL_KEYS) | set(SUBSET_KEYS) | set(TOP_KEYS) | COMMAND_LINE_ONLY)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"unknown key `{key}` in {_LEVEL_NAMES[level]}{hint} Keys allowed here: {', '.join(allowed)}"


def _expect_table(value: Any, source: str, path: str) -> None:
    if not isinstance(value, dict):
        raise LorakitError(f"{source}: {path}: expected a table, found {_describe(value)}")


def _validate(model: type[BaseModel], raw: Mapping[str, Any], source: str, path: str):
    try:
        return model(**raw)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        key = str(first["loc"][0])
        raise LorakitError(f"{source}: {path}: `{key}`: {_problem(model, key, first)}") from None


_EXPECTED = {
    "resolution": "a positive integer or [width, height]",
    "face_crop_aug_range": "[min, max] (two numbers)",
    "custom_attributes": "a table",
    "subsets": "an array of tables ([[datasets.subsets]])",
}
_TYPE_WORDS = {int: "an integer", bool: "true or false", str: "a string", float: "a number"}


def _problem(model: type[BaseModel], key: str, error: Mapping[str, Any]) -> str:
    """'expected X, found Y' for one pydantic error, in the words of a config file."""
    found = _describe(error.get("input"))
    context = error.get("ctx") or {}
    if error["type"] == "literal_error":
        return f"expected one of {', '.join(INTERPOLATIONS)}, found {found}"
    if error["type"] == "finite_number":
        return f"expected a finite number, found {found}"
    if error["type"] == "string_too_short":
        return f"expected a non-empty string, found {found}"
    if error["type"] == "string_pattern_mismatch":
        return f"expected a file-name suffix without / or \\ (e.g. .txt), found {found}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if error["type"] in bounds and key not in _EXPECTED:
        limit = next(iter(context.values()))
        return f"must be {bounds[error['type']]} {limit}, found {found}{_range_hint(key)}"
    return f"expected {_expected(model, key)}, found {found}"


def _range_hint(key: str) -> str:
    if "validation_split" == key:
        return " (a fraction of the images, e.g. 0.1)"
    if "rate" in key:
        return " (a probability between 0 and 1)"
    return ""


def _expected(model: type[BaseModel], key: str) -> str:
    if key in _EXPECTED:
        return _EXPECTED[key]
    annotation = model.model_fields[key].annotation
    while get_origin(annotation) in (Union, UnionType, Annotated):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return _TYPE_WORDS.get(annotation, "a different type")


def _describe(value: Any) -> str:
    """A value as a config file's author would name it: `string "1024"`, `float 1.5`, `array [1, 2, 3]`."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", tuple: "array",
             dict: "table", type(None): "null"}
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
    if isinstance(value, (list, tuple)):
        text = json.dumps(list(value), default=repr)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{names.get(type(value), type(value).__name__)} {text}"
