"""Using existing LoRA files: apply for inference, merge into the base (--base_weights), shape a network from a
file (--dim_from_weights). `lora` is the family's layers and names (SDXL's by default, whose files may use SGM or
diffusers-style U-Net names, `lora_unet_down_blocks_…`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.network.io import check_shapes, file_modules, read_lora
from lorakit.network.network import LoRANetwork, build_network
from lorakit.network.targets import SDXL_LORA, LoRALayout, to_sgm_names

logger = logging.getLogger(__name__)

__all__ = ["apply_lora", "file_network", "merge_lora", "network_from_file", "remove_lora", "sdxl_models",
           "to_sgm_names"]

_REGISTRY = "_lorakit_applied_loras"  # attribute on the U-Net (or first model): resolved path -> network


def sdxl_models(target: Any) -> tuple[nn.Module | None, nn.Module | None, nn.Module | None]:
    """(unet, text_encoder1, text_encoder2) of SDXLComponents, a diffusers SDXL pipeline, or a dict of those."""
    def get(*names: str) -> nn.Module | None:
        for name in names:
            value = target.get(name) if isinstance(target, Mapping) else getattr(target, name, None)
            if value is not None:
                return value
        return None

    models = (get("unet"), get("text_encoder1", "text_encoder"), get("text_encoder2", "text_encoder_2"))
    if all(model is None for model in models):
        raise TypeError(f"expected SDXL components (unet, text_encoder1, text_encoder2), got {type(target).__name__}")
    return models


def network_from_file(unet: nn.Module | None, text_encoders: Sequence[nn.Module], state: Mapping[str, Tensor],
                      path: str | os.PathLike, **kwargs) -> LoRANetwork:
    """--dim_from_weights: modules exactly where the file has them, with its ranks and alphas (weights not loaded).

    `kwargs` go to `build_network` (dropout, network_args for block LR weights, train_unet, ...).
    """
    modules = file_modules(state, path)
    if not modules:
        raise LorakitError(f"{path}: no LoRA modules in it (no <name>.lora_down.weight, hada_w1_b or lokr_w1 "
                           f"tensors among its {len(state)}); expected a LoRA file")
    network = build_network(unet, [m for m in text_encoders if m is not None], modules=modules, **kwargs)
    if not network.loras and modules:
        raise LorakitError(f"{path}: none of its {len(modules)} LoRA modules matches a layer of this model (first "
                           f"{next(iter(modules))!r}); is it a LoRA for another architecture?")
    unused = set(modules) - {lora.lora_name for lora in network.loras}
    if unused:
        logger.warning("%s: %d LoRA modules match no layer of these models, e.g. %s", path, len(unused), min(unused))
    return network


def file_network(target: Any, path: str | os.PathLike, multiplier: float = 1.0,
                 lora: LoRALayout = SDXL_LORA) -> tuple[LoRANetwork, dict]:
    """The network a LoRA file describes on `target`'s models, and the file's tensors for it (shapes checked, not
    loaded: the models may live on the meta device). `lora`: the family's layers and names (SDXL's)."""
    unet, te1, te2 = sdxl_models(target)
    state, _ = read_lora(path)
    state = lora.file_names(state, unet)
    network = network_from_file(unet, [te1, te2], state, path, multiplier=multiplier, lora=lora)
    fitting = {key: value for key, value in network.state_dict().items() if key in state}
    check_shapes(path, fitting, state, "is it a LoRA for another architecture?")
    return network, {key: state[key] for key in fitting}


def _loaded_network(target: Any, path: str | os.PathLike, multiplier: float, lora: LoRALayout) -> LoRANetwork:
    network, state = file_network(target, path, multiplier, lora)
    unet, te1, te2 = sdxl_models(target)
    network.load_state_dict(state, strict=False)
    reference = next((m for m in (unet, te1, te2) if m is not None))
    parameter = next(reference.parameters())
    network.to(parameter.device)
    network.requires_grad_(False)
    network.eval()
    return network


def _applied(target: Any) -> dict[str, LoRANetwork]:
    """The files applied to `target` so far (resolved path -> network), kept on its first model."""
    anchor = next(m for m in sdxl_models(target) if m is not None)
    return anchor.__dict__.setdefault(_REGISTRY, {})


def apply_lora(target: Any, path: str | os.PathLike, multiplier: float = 1.0,
               lora: LoRALayout = SDXL_LORA) -> LoRANetwork:
    """Apply an sd-scripts-format LoRA file to SDXL models for inference (hooks; base weights untouched).

    Applying the same file again replaces the earlier application (e.g. with a new multiplier); different files
    stack. Returns the network: `set_multiplier` changes its strength, `detach()` removes it.
    """
    applied = _applied(target)
    key = str(Path(path).resolve())
    if key in applied:
        applied.pop(key).detach()
    network = _loaded_network(target, path, multiplier, lora)
    network.attach()
    applied[key] = network
    return network


def remove_lora(target: Any, path: str | os.PathLike | None = None) -> None:
    """Remove one applied LoRA file (or all when `path` is None)."""
    applied = _applied(target)
    keys = list(applied) if path is None else [str(Path(path).resolve())]
    for key in keys:
        if key in applied:
            applied.pop(key).detach()


@torch.no_grad()
def merge_lora(target: Any, path: str | os.PathLike, multiplier: float = 1.0, lora: LoRALayout = SDXL_LORA) -> int:
    """--base_weights: add a file into the base weights (W += m · up·down · alpha/rank); returns the module count."""
    network = _loaded_network(target, path, multiplier, lora)
    network.merge()
    logger.info("%s merged into the base model at multiplier %g (%d modules)", path, multiplier, len(network.loras))
    return len(network.loras)
