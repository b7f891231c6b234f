"""One training step's forward pass: text conditioning, then noise → U-Net → loss (reference §4.2–4.3).

`diffusion_loss` is the whole step on one screen; the loop (`lorakit.train.trainer`) calls it and does the
backward pass and the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lorakit.data.weighted_captions import parse_weights
from lorakit.models.text_encoding import encode_tokens, sequence_length, split_chunks, tokenize
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
        """(context [B, L, 2048], pooled [B, 1280]) of the captions."""
        if not self.weighted_captions:
            tokens1 = tokenize(self.tokenizer1, captions, self.max_token_length)
            tokens2 = tokenize(self.tokenizer2, captions, self.max_token_length)
            return encode_tokens(self.text_encoder1, self.text_encoder2, tokens1, tokens2)
        tokens1, weights1 = self._weighted(self.tokenizer1, captions)
        tokens2, weights2 = self._weighted(self.tokenizer2, captions)
        return encode_tokens(self.text_encoder1, self.text_encoder2, tokens1, tokens2, weights1, weights2)

    def _weighted(self, tokenizer, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and per-token weights of A1111-weighted captions: each weighted piece is tokenized on its own
        and the pieces concatenated (as sd-scripts does), then padded and chunked like plain captions."""
        length = sequence_length(self.max_token_length)
        rows, weight_rows = [], []
        for caption in captions:
            ids, weights = [], []
            for text, weight in parse_weights(caption):
                piece = tokenizer(text, add_special_tokens=False).input_ids
                ids += piece
                weights += [weight] * len(piece)
            ids = [tokenizer.bos_token_id] + ids[: length - 2] + [tokenizer.eos_token_id]
            weights = [1.0] + weights[: length - 2] + [1.0]
            padding = length - len(ids)
            rows.append(ids + [tokenizer.pad_token_id] * padding)
            weight_rows.append(weights + [1.0] * padding)
        tokens = split_chunks(torch.tensor(rows), tokenizer.eos_token_id, tokenizer.pad_token_id)
        # Same layout as the ids; equal eos/pad arguments skip the id fix-ups, which do not apply to weights.
        weights = split_chunks(torch.tensor(weight_rows), 0, 0)
        return tokens, weights


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
