"""What a checkpoint is, judged from its key names and shapes alone (no tensor data is read).

Users hand trainers SD 1.5 models, refiners, LoRA files and VAEs by mistake; each gets one line saying what the file
looks like instead of a wall of missing keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from lorakit.errors import LorakitError
from lorakit.models.prefixes import (REFINER_TE_PREFIX, SD1_TE_PREFIX, SD2_TE_PREFIX, TE1_PREFIX, TE2_PREFIX,
                                     UNET_PREFIX, VAE_PREFIX)

VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

_LORA_KEY = re.compile(r"(^|\.)lora_(unet|te\d?)_|\.lora_(down|up|A|B)\.|\.hada_w1_a$|\.lokr_w1$")
_DIFFUSERS_KEY = re.compile(r"^(unet\.)?(down_blocks|mid_block|up_blocks|conv_in|time_embedding)\.")

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class CheckpointKind:
    """`name` is a noun phrase ("SD 1.x", "a LoRA file"); `evidence` the keys or widths that show it."""

    name: str
    evidence: str

    @property
    def is_sdxl(self) -> bool:
        return self.name == "SDXL"


def checkpoint_kind(shapes: Shapes) -> CheckpointKind:
    """Classify a state dict by its key names and shapes."""
    keys = list(shapes)
    if not keys:
        return CheckpointKind("an empty file", "no tensors")
    for marker, name in (("joint_blocks.", "Stable Diffusion 3"), ("double_blocks.", "Flux")):
        if key := _first(keys, lambda k, m=marker: m in k):
            return CheckpointKind(name, f"key {key}")
    if key := _first(keys, _LORA_KEY.search):
        return CheckpointKind("a LoRA file", f"key {key}")
    for prefix, name in ((SD1_TE_PREFIX, "SD 1.x"), (SD2_TE_PREFIX, "SD 2.x")):
        if _first(keys, lambda k, p=prefix: k.startswith(p)):
            return CheckpointKind(name, f"{prefix}* keys, U-Net cross-attention width {_cross_width(shapes)}")
    has = {prefix: _first(keys, lambda k, p=prefix: k.startswith(p)) is not None
           for prefix in (UNET_PREFIX, TE1_PREFIX, TE2_PREFIX, VAE_PREFIX)}
    if has[UNET_PREFIX] and has[TE1_PREFIX] and has[TE2_PREFIX]:
        return CheckpointKind("SDXL", f"{UNET_PREFIX}*, {TE1_PREFIX}* and {TE2_PREFIX}* keys")
    if _first(keys, lambda k: k.startswith(REFINER_TE_PREFIX)) and not has[TE1_PREFIX]:
        return CheckpointKind("the SDXL refiner", "its only text encoder, conditioner.embedders.0, is OpenCLIP; "
                                                  f"U-Net cross-attention width {_cross_width(shapes)}")
    if vae_prefix(shapes) is not None:
        return CheckpointKind("a VAE only", "only encoder/decoder keys")
    if key := _first(keys, _DIFFUSERS_KEY.match):
        return CheckpointKind("a diffusers-format state dict", f"key {key}; expected the original SGM key layout")
    if has[UNET_PREFIX]:
        missing = [p for p in (TE1_PREFIX, TE2_PREFIX) if not has[p]]
        return CheckpointKind("a U-Net without SDXL's two text encoders", f"no {' or '.join(missing)}* keys")
    return CheckpointKind("an unknown model", f"none of {UNET_PREFIX}, {TE1_PREFIX}, {TE2_PREFIX}; "
                                              f"first keys: {', '.join(sorted(keys)[:3])}")


def require_sdxl(shapes: Shapes, source: str) -> None:
    """Raise one line unless `shapes` looks like an SDXL base checkpoint."""
    kind = checkpoint_kind(shapes)
    if not kind.is_sdxl:
        raise LorakitError(f"{source} does not look like an SDXL checkpoint: it looks like {kind.name} "
                           f"({kind.evidence})")


def vae_prefix(shapes: Shapes) -> str | None:
    """The prefix of a VAE-only state dict ("" or "first_stage_model."), or None when it holds anything else."""
    for prefix in ("", VAE_PREFIX):
        if shapes and all(key.startswith(prefix) and key[len(prefix):].startswith(VAE_TOP_LEVEL) for key in shapes):
            return prefix
    return None


def _first(keys: Sequence[str], predicate) -> str | None:
    return next((key for key in keys if predicate(key)), None)


def _cross_width(shapes: Shapes) -> int | str:
    """Input width of the first cross-attention key projection (768 SD 1.x, 1024 SD 2.x, 2048 SDXL)."""
    key = _first(sorted(shapes), lambda k: k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return shapes[key][-1] if key else "unknown"
