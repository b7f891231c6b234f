"""A loaded base model: its networks (U-Net, VAE, text encoders), tokenizers and where they came from; and the
parts a checkpoint of a family is made of (`ModelPart`), which the loader and the random-model writer walk."""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import torch

from lorakit.hashing import legacy_model_hash, sha256_file

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


@dataclass(frozen=True)
class ModelIdentity:
    """Name and file hashes of a model, as LoRA metadata records them (`ss_sd_model_name`, `ss_sd_model_hash`,
`ss_new_sd_model_hash`).

    `name` is the basename of a local path or the hub id. The hashes are computed on first use and cached:
    hashing a 7 GB checkpoint takes a while, and loading must not wait for it.
    """

    name: str
    path: str | None

    @classmethod
    def of(cls, path_or_id: str | os.PathLike) -> ModelIdentity:
        text = os.fspath(path_or_id)
        if os.path.exists(text):
            return cls(name=Path(text).name, path=str(Path(text).resolve()))
        return cls(name=text, path=None)

    @functools.cached_property
    def legacy_hash(self) -> str | None:
        """`ss_sd_model_hash`: A1111's old 8-hex hash; None unless the model is a local path."""
        return legacy_model_hash(self.path) if self.path else None

    @functools.cached_property
    def sha256(self) -> str | None:
        """`ss_new_sd_model_hash`: SHA-256 of the whole file; None unless the model is a local file."""
        return sha256_file(self.path) if self.path and os.path.isfile(self.path) else None


class Components(ABC):
    """What every family's components answer: the networks by attribute, the text encoders and tokenizers in
    order, and `release` (a released network's slot is None)."""

    TEXT_ENCODERS: ClassVar[tuple[str, ...]]
    TOKENIZERS: ClassVar[tuple[str, ...]]

    @property
    def text_encoders(self) -> list[torch.nn.Module | None]:
        return [getattr(self, name) for name in self.TEXT_ENCODERS]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [getattr(self, name) for name in self.TOKENIZERS]

    def release(self, *attributes: str) -> None:
        for attribute in attributes:
            setattr(self, attribute, None)

    @abstractmethod
    def parts(self) -> tuple[ModelPart, ...]:
        """The model's networks as a checkpoint stores them (`ModelPart`), in checkpoint order."""

    @abstractmethod
    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks by attribute name, in checkpoint order."""


@dataclass
class SDXLComponents(Components):
    """SDXL as diffusers and transformers modules.

    text_encoder1 is CLIP ViT-L/14 (`CLIPTextModel`), text_encoder2 OpenCLIP ViT-bigG/14 converted to
    `CLIPTextModelWithProjection`. `vae_identity` is set when the VAE came from a separate `--vae`. A network is
    None when it was not loaded (`load_sdxl(skip=...)`) or has been released.
    """

    unet: torch.nn.Module | None
    vae: torch.nn.Module | None
    text_encoder1: torch.nn.Module | None
    text_encoder2: torch.nn.Module | None
    tokenizer1: CLIPTokenizer
    tokenizer2: CLIPTokenizer
    identity: ModelIdentity
    vae_identity: ModelIdentity | None = None

    TEXT_ENCODERS: ClassVar[tuple[str, ...]] = ("text_encoder1", "text_encoder2")
    TOKENIZERS: ClassVar[tuple[str, ...]] = ("tokenizer1", "tokenizer2")

    def networks(self) -> dict[str, torch.nn.Module]:
        """The four networks by attribute name, in checkpoint order."""
        return {"unet": self.unet, "text_encoder1": self.text_encoder1, "text_encoder2": self.text_encoder2,
                "vae": self.vae}

    def parts(self) -> tuple[ModelPart, ...]:
        return sdxl_parts()


@dataclass(frozen=True)
class ModelPart:
    """One network of a model: its class, its diffusers subfolder and its place in a single-file checkpoint.

    `config(size)` and `config_from_sgm(shapes)` give what `build(config)` takes; `config_of(module)` recovers it
    from a built module; `to_diffusers` / `to_sgm` rename state dicts between the two layouts.
    """

    attribute: str
    subfolder: str
    prefix: str
    model_class: type[torch.nn.Module]
    config: Callable[[str], Any]
    config_from_sgm: Callable[[Mapping[str, tuple[int, ...]]], Any]
    to_diffusers: Callable[[Mapping[str, torch.Tensor], Any], dict[str, torch.Tensor]]
    to_sgm: Callable[[Mapping[str, torch.Tensor], Any], dict[str, torch.Tensor]]

    @property
    def is_diffusers(self) -> bool:
        """diffusers models take their config as keyword arguments; transformers models take a config object."""
        return self.model_class.__module__.startswith("diffusers.")

    def build(self, config: Any) -> torch.nn.Module:
        return self.model_class(**config) if self.is_diffusers else self.model_class(config)

    def config_of(self, module: torch.nn.Module) -> Any:
        if self.is_diffusers:
            return {key: value for key, value in module.config.items() if not key.startswith("_")}
        return module.config


@functools.cache
def sdxl_parts() -> tuple[ModelPart, ...]:
    """The U-Net, TE1, TE2 and VAE in the order of an SGM checkpoint (imported lazily: diffusers is heavy)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lorakit.models import text_encoders, unet, vae
    from lorakit.models.prefixes import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, VAE_PREFIX

    return (
        ModelPart("unet", "unet", UNET_PREFIX, UNet2DConditionModel, unet.unet_config, unet.unet_config_from_sgm,
                unet.unet_to_diffusers, unet.unet_to_sgm),
        ModelPart("text_encoder1", "text_encoder", TE1_PREFIX, CLIPTextModel, text_encoders.te1_config,
                text_encoders.te1_config_from_sgm, text_encoders.te1_to_diffusers, text_encoders.te1_to_sgm),
        ModelPart("text_encoder2", "text_encoder_2", TE2_PREFIX, CLIPTextModelWithProjection,
                text_encoders.te2_config, text_encoders.te2_config_from_sgm, text_encoders.te2_to_diffusers,
                text_encoders.te2_to_sgm),
        ModelPart("vae", "vae", VAE_PREFIX, AutoencoderKL, vae.vae_config, vae.vae_config_from_sgm,
                vae.vae_to_diffusers, vae.vae_to_sgm),
    )


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with its floating weights in `dtype` (in place). diffusers' `ModelMixin.to(dtype)` warns about
    `_keep_in_fp32_modules` even when the list is empty, as it is for SDXL's U-Net and VAE: torch's own cast does
    the same without the noise."""
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        torch.nn.Module.to(model, dtype)
    return model
