"""One training step's forward pass: noise → U-Net → loss (sd-scripts' `train_network.py`,
`NetworkTrainer.process_batch`).

`denoising_loss` is the whole step on one screen, for any family's U-Net call; the loop
(`lorakit.train.trainer`) gives it the batch's latents and the family's prediction, then does the backward pass
and the optimizer step. `diffusion_loss` is the same step on a bare SDXL U-Net (tests and benchmarks call it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.data.text_cache import CaptionEncoder
from lorakit.models.conditioning import predict
from lorakit.train.loss import LossOptions, training_loss
from lorakit.train.noise import NoiseOptions, NoiseSchedule, noisy_batch, v_target

Prediction = Callable[[Tensor, Tensor], Tensor]  # (noisy latents, timesteps) -> the U-Net's ε or v


class TextEncoding(CaptionEncoder):
    """SDXL's live text conditioning from its two tokenizers and encoders: (context [B, L, 2048], pooled [B, 1280])
    of the captions, as the text cache encodes them."""

    def __init__(self, tokenizer1, tokenizer2, text_encoder1: torch.nn.Module, text_encoder2: torch.nn.Module,
                 max_token_length: int | None, weighted_captions: bool = False) -> None:
        super().__init__((tokenizer1, tokenizer2), (text_encoder1, text_encoder2), max_token_length,
                         weighted_captions)


@dataclass(frozen=True)
class StepOptions:
    schedule: NoiseSchedule
    noise: NoiseOptions
    loss: LossOptions
    v_parameterization: bool = False


def diffusion_loss(unet: torch.nn.Module, latents: Tensor, context: Tensor, pooled: Tensor, time_ids: Tensor,
                   options: StepOptions, generator: torch.Generator, **kwargs) -> Tensor:
    """`denoising_loss` of a bare SDXL U-Net with the batch's text conditioning and size/crop ids."""
    return denoising_loss(lambda noisy, timesteps: predict(unet, noisy, timesteps, context, pooled, time_ids),
                          latents, options, generator, **kwargs)


def denoising_loss(prediction_of: Prediction, latents: Tensor, options: StepOptions, generator: torch.Generator, *,
                   loss_weights: Tensor | None = None, masks: Tensor | None = None, preserve: Tensor | None = None,
                   base_prediction: Prediction | None = None) -> Tensor:
    """The scalar loss of a batch of scaled latents: draw noise and timesteps, predict, compare with the target.

    `preserve` marks samples whose target is the base model's own prediction (differential output preservation);
    `base_prediction(noisy, timesteps)` computes it with the LoRA switched off.
    """
    noisy = noisy_batch(latents, options.schedule, options.noise, generator)
    prediction = prediction_of(noisy.noisy_latents, noisy.timesteps)
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
