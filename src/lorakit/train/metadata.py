"""The `ss_*` metadata of a saved LoRA (as `train_network.py`'s `NetworkTrainer.train`
writes it), built once per run from the config and the run's facts;
each save adds only what changes (finish time, steps, epoch)."""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.config import TrainConfig
from lorakit.data.buckets import aspect_ratio_error
from lorakit.data.dataset import TrainingData
from lorakit.errors import LorakitError
from lorakit.families.base import ModelFamily
from lorakit.fileio import kind_of
from lorakit.models.components import ModelIdentity
from lorakit.network.io import build_modelspec

# The caption keys sd-scripts writes for each subset in ss_datasets, in its order.
_SUBSET_CAPTION_KEYS = ("shuffle_caption", "keep_tokens", "keep_tokens_separator", "secondary_separator",
                        "enable_wildcard", "caption_prefix", "caption_suffix")


@dataclass(frozen=True)
class RunFacts:
    """What the run computed that metadata records."""

    session_id: int
    started_at: float
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    optimizer: str  # ss_optimizer, e.g. "torch.optim.adamw.AdamW(weight_decay=0.1)"
    learning_rate: float | None  # None with Adafactor's relative step
    lr_scheduler: str
    network_args: dict[str, str] | None
    network_alpha: float
    seed: int
    total_batch_size: int


def run_metadata(config: TrainConfig, facts: RunFacts, data: TrainingData, model: ModelIdentity,
                 vae: ModelIdentity | None, family: ModelFamily) -> dict[str, str]:
    """The metadata every save of this run shares (`--no_metadata` keeps the minimal keys)."""
    text_encoder_lr = config.text_encoder_lr1 if config.text_encoder_lr1 is not None else config.learning_rate
    metadata: dict[str, object] = {
        "ss_network_module": config.network_module or "networks.lora",
        "ss_network_dim": config.network_dim if config.network_dim is not None else 4,
        "ss_network_alpha": float(facts.network_alpha),
        **family.metadata(config.v_parameterization),
    }
    if facts.network_args:  # sd-scripts writes it only when --network_args was given
        metadata["ss_network_args"] = json.dumps(facts.network_args)
    if not config.no_metadata:
        metadata |= _training_metadata(config, facts, text_encoder_lr) | _dataset_metadata(data)
        metadata |= _model_metadata("sd_model", model) | (_model_metadata("vae", vae) if vae else {})
    architecture, default_resolution = family.modelspec(config.v_parameterization)
    spec = build_modelspec(
        title=config.metadata_title or config.output_name, timestamp=facts.started_at,
        resolution=_resolution(config, data), architecture=architecture, default_resolution=default_resolution,
        v_parameterization=config.v_parameterization,
        timestep_range=(config.min_timestep, config.max_timestep), clip_skip=config.clip_skip,
        author=config.metadata_author, description=config.metadata_description, license=config.metadata_license,
        tags=config.metadata_tags, merged_from=config.metadata_merged_from, usage_hint=config.metadata_usage_hint,
        thumbnail=thumbnail_url(config.metadata_thumbnail), trigger_phrase=config.metadata_trigger_phrase,
        preprocessor=config.metadata_preprocessor, is_negative_embedding=config.metadata_is_negative_embedding,
    )
    return {key: str(value) for key, value in metadata.items()} | spec


def thumbnail_url(value: str | None) -> str | None:
    """--metadata_thumbnail: a `data:` URL as given, an image file as a `data:` URL of its bytes (as sd-scripts)."""
    if value is None:
        return value
    if value.startswith("data:"):
        header, comma, data = value.partition(",")
        try:
            valid = bool(comma) and header.startswith("data:image/") and header.endswith(";base64") and bool(
                base64.b64decode(data, validate=True))
        except ValueError:
            valid = False
        if not valid:
            raise LorakitError(f"--metadata_thumbnail {value[:60]}: expected an image data URL "
                               "(data:image/png;base64,...) or an image file")
        return value
    if kind_of(value, "--metadata_thumbnail") != "file":
        raise LorakitError(f"--metadata_thumbnail {value}: no such file; expected an image file or a data: URL")
    mime = mimetypes.guess_type(value)[0] or ""
    if not mime.startswith("image/"):
        raise LorakitError(f"--metadata_thumbnail {value}: expected an image file (.png, .jpg, .webp) or a data: URL")
    data = base64.b64encode(Path(value).read_bytes()).decode("ascii")
    return f"data:{mime};base64,{data}"


def save_metadata(shared: dict[str, str], *, steps: int, epoch: int, no_metadata: bool) -> dict[str, str]:
    if no_metadata:
        return dict(shared)
    return shared | {"ss_training_finished_at": str(time.time()), "ss_steps": str(steps), "ss_epoch": str(epoch)}


def _training_metadata(config: TrainConfig, facts: RunFacts, text_encoder_lr: float | None) -> dict[str, object]:
    c = config
    return {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.started_at,
        "ss_output_name": c.output_name,
        "ss_learning_rate": facts.learning_rate,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_text_encoder_lr1": c.text_encoder_lr1, "ss_text_encoder_lr2": c.text_encoder_lr2,
        "ss_unet_lr": c.unet_lr,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": c.gradient_checkpointing,
        "ss_gradient_accumulation_steps": c.gradient_accumulation_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": c.lr_warmup_steps,
        "ss_lr_scheduler": facts.lr_scheduler,
        "ss_network_dropout": c.network_dropout,
        "ss_mixed_precision": c.mixed_precision,
        "ss_full_fp16": c.full_fp16,
        "ss_clip_skip": c.clip_skip,
        "ss_max_token_length": c.max_token_length,
        "ss_cache_latents": c.cache_latents,
        "ss_seed": facts.seed,
        "ss_lowram": c.lowram,
        "ss_noise_offset": c.noise_offset,
        "ss_multires_noise_iterations": c.multires_noise_iterations,
        "ss_multires_noise_discount": c.multires_noise_discount,
        "ss_adaptive_noise_scale": c.adaptive_noise_scale,
        "ss_zero_terminal_snr": c.zero_terminal_snr,
        "ss_training_comment": c.training_comment,
        "ss_sd_scripts_commit_hash": "(lorakit)",
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": c.max_grad_norm,
        "ss_caption_dropout_rate": c.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": c.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": c.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": c.face_crop_aug_range,
        "ss_prior_loss_weight": c.prior_loss_weight,
        "ss_min_snr_gamma": c.min_snr_gamma,
        "ss_scale_weight_norms": c.scale_weight_norms,
        "ss_ip_noise_gamma": c.ip_noise_gamma,
        "ss_debiased_estimation": c.debiased_estimation_loss,
        "ss_noise_offset_random_strength": c.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": c.ip_noise_gamma_random_strength,
        "ss_loss_type": c.loss_type,
        "ss_huber_schedule": c.huber_schedule,
        "ss_huber_scale": c.huber_scale,
        "ss_huber_c": c.huber_c,
        "ss_fp8_base": c.fp8_base,
        "ss_fp8_base_unet": c.fp8_base_unet,
        "ss_validation_seed": c.validation_seed,
        "ss_validation_split": c.validation_split,
        "ss_max_validation_steps": c.max_validation_steps,
        "ss_validate_every_n_epochs": c.validate_every_n_epochs,
        "ss_validate_every_n_steps": c.validate_every_n_steps,
        "ss_resize_interpolation": c.resize_interpolation,
    }


def _dataset_metadata(data: TrainingData) -> dict[str, object]:
    datasets = data.datasets
    train_images = sum(d.train_samples for d in datasets)
    reg_images = sum(d.reg_samples_before_balancing for d in datasets)
    validation_images = sum(len(d.validation) for d in datasets)
    tag_frequency: dict[str, dict[str, int]] = {}
    dataset_dirs: dict[str, dict[str, int]] = {}
    described = []
    for index, dataset in enumerate(datasets):
        counts = data.bucket_counts(index)
        subsets = []
        for subset in dataset.settings.subsets:
            records = [r for r in dataset.train if r.subset is subset]
            folder = _basename(subset.image_dir or subset.metadata_file)
            if not subset.is_reg:
                frequency = tag_frequency.setdefault(folder, {})
                for record in records:
                    for tag in record.caption.split(","):
                        tag = tag.strip().lower()
                        if tag:
                            frequency[tag] = frequency.get(tag, 0) + 1
                dataset_dirs.setdefault(folder, {"n_repeats": subset.num_repeats, "img_count": len(records)})
            subsets.append({
                "img_count": len(records), "num_repeats": subset.num_repeats, "color_aug": subset.color_aug,
                "flip_aug": subset.flip_aug, "random_crop": subset.random_crop,
                **{key: getattr(subset.captions, key) for key in _SUBSET_CAPTION_KEYS},
                "resize_interpolation": subset.resize_interpolation, "image_dir": folder,
                **({"class_tokens": subset.class_tokens, "is_reg": subset.is_reg} if subset.kind != "fine_tuning"
                   else {"metadata_file": _basename(subset.metadata_file)}),
            })
        settings = dataset.settings
        described.append({
            "is_dreambooth": settings.kind != "fine_tuning", "batch_size_per_device": settings.batch_size,
            "num_train_images": dataset.train_samples, "num_reg_images": dataset.reg_samples_before_balancing,
            "resolution": list(settings.resolution), "enable_bucket": settings.enable_bucket,
            "min_bucket_reso": settings.min_bucket_reso, "max_bucket_reso": settings.max_bucket_reso,
            "tag_frequency": tag_frequency, "resize_interpolation": settings.resize_interpolation,
            "bucket_info": {"buckets": {str(i): {"resolution": list(bucket), "count": count}
                                        for i, (bucket, count) in enumerate(sorted(counts.items()))},
                            "mean_img_ar_error": _mean_ar_error(data, index)},
            "subsets": subsets,
        })
    return {
        "ss_num_train_images": train_images,
        "ss_num_validation_images": validation_images,
        "ss_num_reg_images": reg_images,
        "ss_datasets": json.dumps(described),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
    }


def _mean_ar_error(data: TrainingData, index: int) -> float:
    samples = data.samples[index]
    if not samples:
        return 0.0
    errors = [abs(aspect_ratio_error(s.record.size, s.bucket)) for s in samples]
    return sum(errors) / len(errors)


def _model_metadata(kind: str, identity: ModelIdentity) -> dict[str, object]:
    """ss_<kind>_name, and the legacy and full hashes when the model is a local file (hashing reads it once)."""
    result: dict[str, object] = {f"ss_{kind}_name": identity.name}
    if identity.path and os.path.isfile(identity.path):
        result[f"ss_{kind}_hash"] = identity.legacy_hash
        result[f"ss_new_{kind}_hash"] = identity.sha256
    return result


def _resolution(config: TrainConfig, data: TrainingData) -> tuple[int, int] | None:
    """--resolution, else the first dataset's (sd-scripts falls back to 1024x1024 here, a documented slip)."""
    if config.resolution:
        return tuple(config.resolution)
    return tuple(data.datasets[0].settings.resolution) if data.datasets else None


def _basename(path: Path | None) -> str:
    return Path(path).name if path else ""

