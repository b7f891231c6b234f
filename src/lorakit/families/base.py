"""The adapter between lorakit's trainer and a family of base models (docs/model-families.md).

The trainer, the step, the caches, sampling, validation and saving talk to a `ModelFamily` only; what a family
is made of (its checkpoints' layout, text conditioning, U-Net call, LoRA names, sampling pipeline, metadata) lives
in its own module under `lorakit.families`.
"""

from __future__ import annotations

import contextlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lorakit.data.weighted_captions import plain_text
from lorakit.models.components import Components
from lorakit.models.loading import ModelLayout, load_model
from lorakit.network.targets import LoRALayout

if TYPE_CHECKING:
    from PIL import Image

    from lorakit.data.text_cache import CaptionEncoder

TextOutputs = tuple[Tensor, ...]  # a batch's text conditioning: SDXL (context, pooled), SD 1.x/2.x (context,)


class ModelFamily(ABC):
    """One family of base models. Subclasses set the attributes and implement the methods below."""

    name: str  # --model_family: "sdxl", "sd1", "sd2"
    title: str  # "SDXL", "SD 1.x", "SD 2.x" (messages)
    layout: ModelLayout  # how its checkpoints and folders are stored (lorakit.models.loading)
    latent_scale: float  # the VAE's scaling factor
    bucket_multiple: int  # image sides the U-Net takes: 8 (VAE) x 2 per down-sampling level
    text_encoder_labels: tuple[str, ...]  # the text encoders as summaries and groups name them: ("TE1", "TE2")
    text_encoder_lr_flags: tuple[str, ...]  # the learning-rate flag of each text encoder
    lora: LoRALayout  # which layers carry LoRA and sd-scripts' names for them (lorakit.network.targets)

    def load(self, path: str | os.PathLike, *, vae: str | os.PathLike | None = None,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             tokenizer_cache_dir: str | os.PathLike | None = None, skip: Collection[str] = ()) -> Components:
        """The model of a single file, a diffusers folder or a hub id (`lorakit.models.loading.load_model`)."""
        return load_model(self.layout, path, vae=vae, dtype=dtype, device=device,
                          tokenizer_cache_dir=tokenizer_cache_dir, skip=skip)

    @abstractmethod
    def caption_encoder(self, components: Components, *, max_token_length: int | None, weighted: bool,
                        clip_skip: int | None) -> CaptionEncoder:
        """Captions -> `TextOutputs` with the components' tokenizers and live text encoders."""

    @abstractmethod
    def predict(self, unet: nn.Module, noisy: Tensor, timesteps: Tensor, text: TextOutputs,
                sizes: Tensor) -> Tensor:
        """The U-Net's prediction (ε or v). `sizes` [B, 6]: original height, width, crop top, left, target height,
        width of each image (SDXL conditions on them; other families ignore them)."""

    @abstractmethod
    def text_stand_in(self, unet: nn.Module, batch_size: int, tokens: int) -> TextOutputs:
        """Uninitialised text conditioning of a batch in the U-Net's shapes, device and dtype (the memory plan
        runs the U-Net on the meta device with it)."""

    @abstractmethod
    def sample(self, components: Components, unet: nn.Module, text_encoders: Sequence[nn.Module], prompt,
               seed: int, *, v_parameterization: bool, device: torch.device, dtype: torch.dtype, scheduler,
               clip_skip: int | None = None) -> Image.Image:
        """One sample image of a `SamplePrompt` through the family's diffusers pipeline, from the live modules,
        with `scheduler` (a diffusers scheduler of the prompt's sampler)."""

    @abstractmethod
    def metadata(self, v_parameterization: bool) -> dict[str, object]:
        """The `ss_*` keys that name the base model (`ss_v2`, `ss_base_model_version`)."""

    @abstractmethod
    def modelspec(self, v_parameterization: bool) -> tuple[str, tuple[int, int]]:
        """modelspec.architecture of its LoRA files and the default modelspec.resolution (width, height)."""


CHUNK_TOKENS = 75
MAX_CHUNKS = 3  # sd-scripts' max_embeddings_multiples: prompts of up to 225 tokens


def token_budget(tokenizer, texts: Sequence[str]) -> int:
    """75, 150 or 225: enough 75-token chunks for the longest text (prompt and negative share a length)."""
    longest = max(len(tokenizer(plain_text(text), add_special_tokens=False, verbose=False).input_ids)
                  for text in texts)
    return CHUNK_TOKENS * min(MAX_CHUNKS, max(1, math.ceil(longest / CHUNK_TOKENS)))


def autocast(device: torch.device, dtype: torch.dtype):
    """Sampling under autocast unless the run computes in fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
