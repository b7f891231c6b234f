"""One training step's forward pass: text conditioning, then noise → U-Net → loss (reference §4.2–4.3).

`diffusion_loss` is the whole step on one screen; the loop (`lorakit.train.trainer`) calls it and does the
backward pass and the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lorakit.data.text_cache import encode_captions
from lorakit.train.loss import LossOptions, training_loss
from lorakit.train.noise import NoiseOptions, NoiseSchedule, noisy_batch, v_target


@dataclass
class TextEncoding:
    """Live text conditioning: both tokenizers and encoders, how long captions may be, and caption weights."""

    tokenizer1: object
    tokenizer2: object
    text_encoder1: torch.nn.Module
    text_encoder2: torch.nn.Module
    max_token_length: int | None
    weighted_captions: bool = False

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(context [B, L, 2048], pooled [B, 1280]) of the captions, as the text cache encodes them."""
        return encode_captions(captions, (self.tokenizer1, self.tokenizer2), (self.text_encoder1, self.text_encoder2),
                               self.max_token_length, self.weighted_captions)


@dataclass(frozen=True)
class StepOptions:
    schedule: NoiseSchedule
    noise: NoiseOptions
    loss: LossOptions
    v_parameterization: bool = False


def predict(unet: torch.nn.Module, noisy: Tensor, timesteps: Tensor, context: Tensor, pooled: Tensor,
            time_ids: Tensor) -> Tensor:
    """The U-Net's prediction (ε or v) with SDXL's added size/crop conditioning."""
    dtype = unet.dtype if unet.dtype.is_floating_point and unet.dtype.itemsize > 1 else noisy.dtype
    return unet(
        noisy.to(dtype), timesteps, context.to(dtype),
        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(noisy.device, dtype)},
    ).sample


def diffusion_loss(unet: torch.nn.Module, latents: Tensor, context: Tensor, pooled: Tensor, time_ids: Tensor,
                   options: StepOptions, generator: torch.Generator, *, loss_weights: Tensor | None = None,
                   masks: Tensor | None = None, preserve: Tensor | None = None,
                   base_prediction=None) -> Tensor:
    """The scalar loss of a batch of scaled latents: draw noise and timesteps, predict, compare with the target.

    `preserve` marks samples whose target is the base model's own prediction (differential output preservation);
    `base_prediction(noisy, timesteps)` computes it with the LoRA switched off.
    """
    noisy = noisy_batch(latents, options.schedule, options.noise, generator)
    prediction = predict(unet, noisy.noisy_latents, noisy.timesteps, context, pooled, time_ids)
    if options.v_parameterization:
        target = v_target(latents, noisy.noise, noisy.timesteps, options.schedule.alphas_cumprod)
    else:
        target = noisy.noise
    if preserve is not None and bool(preserve.any()):
        with torch.no_grad():
            base = base_prediction(noisy.noisy_latents, noisy.timesteps)
        target = torch.where(preserve.to(target.device).view(-1, 1, 1, 1), base.to(target.dtype), target)
    return training_loss(prediction.float(), target.float(), noisy.timesteps, options.schedule.alphas_cumprod,
                         options.schedule.snr, options.loss, loss_weights, masks)
