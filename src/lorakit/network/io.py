"""LoRA files: saving with sd-scripts' metadata and hashes, reading, loading into a network (`networks/lora.py`'s
`LoRANetwork.save_weights` / `load_weights`, `train_network.py`'s metadata, `library/sai_model_spec.py`).

Metadata hand-over: the trainer builds sd-scripts' `ss_*` values once per run (`TRAINER_METADATA_KEYS`; values are
`str()` of Python values, `None` as "None") and updates `ss_steps`, `ss_epoch`, `ss_training_finished_at` per save;
`build_modelspec(...)` gives the `modelspec.*` keys; `save_lora` adds `sshs_model_hash` and `sshs_legacy_hash`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from lorakit import __version__
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_path
from lorakit.hashing import sshs_legacy_hash, sshs_model_hash
from lorakit.network.module import ModuleSpec
from lorakit.network.targets import SDXL_LORA, LoRALayout

logger = logging.getLogger(__name__)

# The ss_* keys sd-scripts writes for an SDXL LoRA (`train_network.py`'s `NetworkTrainer.train`) that the trainer
# fills in. Dataset keys depend on the dataset source: with --dataset_config `DATASET_CONFIG_METADATA_KEYS`,
# without it `DATASET_CLI_METADATA_KEYS`. `ss_network_args` only when --network_args was given.
TRAINER_METADATA_KEYS = (
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_unet_lr",
    "ss_text_encoder_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images",
    "ss_num_batches_per_epoch", "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps",
    "ss_max_train_steps", "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim",
    "ss_network_alpha", "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2",
    "ss_base_model_version", "ss_clip_skip", "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram",
    "ss_noise_offset", "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale",
    "ss_zero_terminal_snr", "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm",
    "ss_caption_dropout_rate", "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate",
    "ss_face_crop_aug_range", "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms",
    "ss_ip_noise_gamma", "ss_debiased_estimation", "ss_noise_offset_random_strength",
    "ss_ip_noise_gamma_random_strength", "ss_loss_type", "ss_huber_schedule", "ss_huber_scale", "ss_huber_c",
    "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed", "ss_validation_split", "ss_max_validation_steps",
    "ss_validate_every_n_epochs", "ss_validate_every_n_steps", "ss_resize_interpolation", "ss_sd_model_name",
    "ss_training_finished_at", "ss_steps", "ss_epoch",
)
DATASET_CONFIG_METADATA_KEYS = ("ss_datasets", "ss_tag_frequency", "ss_dataset_dirs")
DATASET_CLI_METADATA_KEYS = (
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info",
)
# Only when the model (or --vae) is a local file.
MODEL_HASH_METADATA_KEYS = ("ss_sd_model_hash", "ss_new_sd_model_hash")
VAE_METADATA_KEYS = ("ss_vae_name", "ss_vae_hash", "ss_new_vae_hash")
# What --no_metadata keeps of the trainer's keys (modelspec and sshs_* are always written).
MINIMAL_METADATA_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                         "ss_network_alpha", "ss_network_args")

MODELSPEC_VERSION = "1.0.1"
SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


def build_modelspec(
    *,
    title: str | None,
    timestamp: float,
    resolution: tuple[int, int] | None = None,
    architecture: str = SDXL_LORA_ARCHITECTURE,
    default_resolution: tuple[int, int] = (1024, 1024),
    v_parameterization: bool = False,
    timestep_range: tuple[int | None, int | None] | None = None,
    clip_skip: int | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    merged_from: str | None = None,
    usage_hint: str | None = None,
    thumbnail: str | None = None,
    trigger_phrase: str | None = None,
    preprocessor: str | None = None,
    is_negative_embedding: str | None = None,
) -> dict[str, str]:
    """The `modelspec.*` keys sd-scripts writes for a LoRA (`library/sai_model_spec.py`'s `build_metadata`), from
    `--metadata_*` and run values.

    `title`: --metadata_title or --output_name (None gives `LoRA@<date>`); `resolution`: (width, height) of
    --resolution (None gives `default_resolution`, the family's); `architecture`: the family's LoRA
    architecture (SDXL's by default); `timestamp`: the save time (unix seconds).
    """
    date = datetime.datetime.fromtimestamp(timestamp).replace(microsecond=0).isoformat()
    width, height = resolution or default_resolution
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.implementation_version": f"lorakit/{__version__}",
        "modelspec.title": title or f"LoRA@{date}",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": date,
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if timestep_range is not None and any(t is not None for t in timestep_range):
        low, high = timestep_range
        spec["modelspec.timestep_range"] = f"{0 if low is None else low},{1000 if high is None else high}"
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    optional = {"author": author, "description": description, "license": license, "tags": tags,
                "merged_from": merged_from, "usage_hint": usage_hint, "thumbnail": thumbnail,
                "trigger_phrase": trigger_phrase, "preprocessor": preprocessor,
                "is_negative_embedding": is_negative_embedding}
    spec.update({f"modelspec.{key}": value for key, value in optional.items() if value is not None})
    return spec


def network_state_dict(network: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The tensors to save: detached CPU copies, cast to `dtype` (the alphas too) when given."""
    return {key: value.detach().to("cpu", dtype=dtype or value.dtype).contiguous()
            for key, value in network.state_dict().items()}


def save_lora(state: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a LoRA file atomically: `.safetensors` with metadata and sshs_* hashes, else a torch tensor dict."""
    path = Path(path)
    state = dict(state)
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            metadata = {key: str(value) for key, value in (metadata or {}).items()}
            # The hashes cover a serialisation with only the ss_* (training) metadata, as sd-scripts computes
            # them, so later edits to user metadata do not change them.
            serialized = safetensors.torch.save(state, {k: v for k, v in metadata.items() if k.startswith("ss_")})
            metadata["sshs_model_hash"] = sshs_model_hash(serialized)
            metadata["sshs_legacy_hash"] = sshs_legacy_hash(serialized)
            del serialized
            safetensors.torch.save_file(state, temporary, metadata)
        else:
            torch.save(state, temporary)


def save_network(network: torch.nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Save a network: dtype = --save_precision, else the parameters' own dtype."""
    save_lora(network_state_dict(network, dtype), path, metadata)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file (`.safetensors`, or `.ckpt`/`.pt`/`.bin` loaded without pickle)."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path}: LoRA file not found")
    if path.suffix != ".safetensors":
        from lorakit.models.loading import load_torch_tensors

        return load_torch_tensors(str(path)), {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except Exception as error:  # a truncated or foreign file: one line, not a traceback
        raise LorakitError(f"{path}: cannot read as a LoRA file ({type(error).__name__}: {error})") from None


# The tensors of each kind of module in LyCORIS' kohya format that lorakit builds.
MODULE_TENSORS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
}


def file_modules(state: Mapping[str, Tensor], source: str | os.PathLike) -> dict[str, ModuleSpec]:
    """lora_name -> its kind, rank and alpha, from the tensor names and shapes of a LoRA, DoRA, LoHa or LoKr file
    (LyCORIS' kohya format); alpha defaults to the rank (old files). A module with tensors of a variant lorakit
    does not build (Tucker factors, decomposed LoKr w1, other LyCORIS algorithms) is refused by name."""
    suffixes: dict[str, set[str]] = {}
    for key in state:
        name, _, suffix = key.partition(".")
        if name.startswith("lora_"):
            suffixes.setdefault(name, set()).add(suffix)
    modules = {}
    for name, found in sorted(suffixes.items()):
        def tensor(suffix: str) -> Tensor | None:
            return state.get(f"{name}.{suffix}")

        if (down := tensor("lora_down.weight")) is not None:
            if down.dim() not in (2, 4):
                raise LorakitError(f"{source}: tensor {name}.lora_down.weight has shape {tuple(down.shape)}; a "
                                   "lora_down weight is 2-D (Linear) or 4-D (Conv2d)")
            algo, rank, extra = ("dora" if "dora_scale" in found else "lora"), down.shape[0], {}
            magnitude, up = tensor("dora_scale"), tensor("lora_up.weight")
            if magnitude is not None and up is not None and magnitude.shape[0] != up.shape[0]:
                raise LorakitError(f"{source}: tensor {name}.dora_scale has shape {tuple(magnitude.shape)}: a DoRA "
                                   "magnitude per input channel (LyCORIS' wd_on_output=False) is not built")
        elif (w1_b := tensor("hada_w1_b")) is not None:
            algo, rank, extra = "loha", _dims(source, f"{name}.hada_w1_b", w1_b, 2)[0], {}
        elif (w1 := tensor("lokr_w1")) is not None:
            w2_a = tensor("lokr_w2_a")
            rank = _dims(source, f"{name}.lokr_w2_a", w2_a, 2)[1] if w2_a is not None else 1
            algo = "lokr"
            extra = {"w1_shape": tuple(_dims(source, f"{name}.lokr_w1", w1, 2)), "factored_w2": w2_a is not None}
        else:
            raise LorakitError(f"{source}: module {name} has tensors {', '.join(sorted(found))}: not a LoRA, DoRA, "
                               "LoHa or LoKr module lorakit builds (install lycoris-lora for other LyCORIS kinds)")
        unknown = found - MODULE_TENSORS[algo]
        if unknown:
            raise LorakitError(f"{source}: tensor {name}.{min(unknown)}: a {algo} variant lorakit does not build "
                               "(Tucker or decomposed factors); install lycoris-lora to use this file")
        alpha = tensor("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise LorakitError(f"{source}: tensor {name}.alpha has shape {tuple(alpha.shape)}; expected one number")
        modules[name] = ModuleSpec(algo, rank, float(alpha) if alpha is not None else float(rank), **extra)
    return modules


def _dims(source: str | os.PathLike, key: str, tensor: Tensor, dims: int) -> tuple[int, ...]:
    if tensor.dim() != dims:
        raise LorakitError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}; expected {dims} dimensions")
    return tuple(tensor.shape)


@dataclass
class LoadReport:
    """What `load_network_weights` did: keys the network has but the file lacks, and the reverse."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    alpha_changed: list[str] = field(default_factory=list)


def load_network_weights(network, path: str | os.PathLike, unet: torch.nn.Module | None = None,
                         lora: LoRALayout = SDXL_LORA) -> LoadReport:
    """--network_weights: load a file into the network; refuse files whose names or shapes do not fit.

    The file's names are renamed by the family's `lora` layout (SDXL: diffusers-style U-Net names, when `unet` is
    given). Where the file's alpha differs from the network's, the file's alpha is used for training and saving.
    """
    state, report = match_network_weights(network, path, unet, lora)
    own = network.state_dict()
    report.alpha_changed = [key for key in sorted(state) if key.endswith(".alpha")
                            and float(own[key]) != float(state[key])]
    network.load_state_dict(state, strict=False)
    if report.alpha_changed:
        logger.info("%s: %d modules have another alpha than --network_alpha; training and saving with the file's",
                    path, len(report.alpha_changed))
    if report.missing or report.unexpected:
        logger.warning("%s: %d tensors missing from the file (kept as initialised), %d unused", path,
                       len(report.missing), len(report.unexpected))
    return report


def match_network_weights(network, path: str | os.PathLike, unet: torch.nn.Module | None = None,
                          lora: LoRALayout = SDXL_LORA) -> tuple[dict[str, Tensor], LoadReport]:
    """The tensors of a LoRA file that fit `network` (names converted as for loading), after checking that every
    one of them has the network's shape; nothing is loaded (the network may live on the meta device)."""
    state, _ = read_lora(path)
    state = lora.file_names(state, unet)
    own = network.state_dict()
    report = LoadReport(missing=sorted(set(own) - set(state)), unexpected=sorted(set(state) - set(own)))
    matched = set(own) & set(state)
    if not matched:
        raise LorakitError(f"{path}: none of its {len(state)} tensors matches this SDXL LoRA network "
                           f"(first key {next(iter(state), 'none')!r}); is it a LoRA for another architecture?")
    check_shapes(path, {key: own[key] for key in matched}, state,
                 "pass --dim_from_weights to take ranks from the file, or the file is for another architecture")
    return {key: state[key] for key in sorted(matched)}, report


def check_shapes(path: str | os.PathLike, expected: Mapping[str, Tensor], found: Mapping[str, Tensor],
                 hint: str) -> None:
    """One line naming the first tensor of a LoRA file whose shape does not fit, or that holds no finite
    floating-point numbers."""
    for key in sorted(expected):
        tensor = found[key]
        if not tensor.is_floating_point():
            raise LorakitError(f"{path}: tensor {key} holds {str(tensor.dtype).removeprefix('torch.')}; expected "
                               "floating-point weights")
        if not torch.isfinite(tensor.float() if tensor.dtype.itemsize == 1 else tensor).all():  # float8: no isfinite
            raise LorakitError(f"{path}: tensor {key} holds NaN or infinite values; the file is damaged")
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise LorakitError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the network expects "
                               f"{tuple(expected[key].shape)}; {hint}")
