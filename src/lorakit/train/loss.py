"""The loss half of a training step: element-wise loss, mask, per-sample weights (sd-scripts'
`library/train_util.py` `conditional_loss` and `library/custom_train_functions.py` `apply_*`).

Order, as sd-scripts: element-wise loss (fp32) → × mask → mean over C,H,W → × per-sample loss weights
(prior_loss_weight for regularisation images) → Min-SNR → scale_v_pred_loss_like_noise_pred → v_pred_like_loss →
debiased estimation → batch mean. SNR′ = SNR clamped to [1e-3, 1000]: sd-scripts clamps only above (t = 0 has
SNR ≈ 1e4); the lower bound only bites with zero-terminal SNR, where SNR_999 = 0 would make 1/√SNR infinite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lorakit.errors import LorakitError

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
SNR_MIN, SNR_MAX = 1e-3, 1000.0


def huber_c(timesteps: Tensor, schedule: HuberSchedule, c: float, scale: float, alphas_cumprod: Tensor) -> Tensor:
    """Per-sample Huber threshold: constant c·scale; exponential exp(−αt)·scale with α = −ln(c)/T;
    snr (1−c)/(1+σ_t)² + c with σ_t = √((1−ᾱ_t)/ᾱ_t) (scale unused, as sd-scripts)."""
    t = timesteps.to("cpu")
    if schedule == "constant":
        values = torch.full(t.shape, c * scale, dtype=torch.float32)
    elif schedule == "exponential":
        alpha = -math.log(c) / alphas_cumprod.shape[0]
        values = torch.exp(-alpha * t.float()) * scale
    elif schedule == "snr":
        alphas = alphas_cumprod[t]
        sigmas = ((1.0 - alphas) / alphas).sqrt()
        values = (1.0 - c) / (1.0 + sigmas) ** 2 + c
    else:
        raise LorakitError(f"--huber_schedule {schedule!r}: expected constant, exponential or snr")
    return values.to(timesteps.device)


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: LossType, c: Tensor | None = None) -> Tensor:
    """Unreduced loss in fp32: l2 (p−y)², l1 |p−y|, huber 2c(√((p−y)²+c²)−c), smooth_l1 2(√((p−y)²+c²)−c)."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if loss_type in ("huber", "smooth_l1"):
        if c is None:
            raise ValueError(f"loss type {loss_type} needs the per-sample Huber c")
        c = c.float().reshape(-1, *([1] * (diff.dim() - 1)))
        smooth = 2.0 * ((diff**2 + c**2).sqrt() - c)
        return c * smooth if loss_type == "huber" else smooth
    raise LorakitError(f"--loss_type {loss_type!r}: expected l2, l1, huber or smooth_l1")


def apply_mask(loss: Tensor, mask: Tensor) -> Tensor:
    """Multiply by a [B,1,H,W] mask in [0,1], resized to the loss's H×W by area averaging."""
    resized = torch.nn.functional.interpolate(mask.to(loss.dtype), size=loss.shape[2:], mode="area")
    return loss * resized


def per_sample_mean(loss: Tensor) -> Tensor:
    """Mean over every dimension but the batch one."""
    return loss.mean(dim=tuple(range(1, loss.dim())))


def clamped_snr(snr: Tensor) -> Tensor:
    """SNR′ used by the v-pred-like and debiased weights (see module docstring)."""
    return snr.clamp(SNR_MIN, SNR_MAX)


def min_snr_weight(snr: Tensor, gamma: float, v_prediction: bool) -> Tensor:
    """Min-SNR: min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction."""
    if v_prediction:
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1.0)
    # Written as min(1, γ/SNR) so that SNR = 0 (zero-terminal SNR) gives the limit 1, not 0/0.
    return torch.clamp(gamma / snr, max=1.0)


def v_pred_scale(snr: Tensor) -> Tensor:
    """SNR′/(SNR′+1): scales a v-prediction loss like an ε-prediction one."""
    snr = clamped_snr(snr)
    return snr / (snr + 1.0)


def debiased_weight(snr: Tensor, v_prediction: bool) -> Tensor:
    """Debiased estimation: 1/√SNR′ (v-prediction: 1/(SNR′+1))."""
    snr = clamped_snr(snr)
    return 1.0 / (snr + 1.0) if v_prediction else 1.0 / snr.sqrt()


@dataclass(frozen=True)
class LossOptions:
    """The loss flags of one run (None = off), as sd-scripts names them."""

    loss_type: LossType = "l2"
    huber_schedule: HuberSchedule = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    v_parameterization: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False


def post_weights(loss: Tensor, snr: Tensor, options: LossOptions) -> Tensor:
    """Apply the optional per-sample weights to a [B] loss, in sd-scripts' order; `snr` is SNR_t per sample."""
    snr = snr.to(loss.device, torch.float32)
    if options.min_snr_gamma:
        loss = loss * min_snr_weight(snr, options.min_snr_gamma, options.v_parameterization)
    if options.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_pred_scale(snr)
    if options.v_pred_like_loss:
        loss = loss + loss / v_pred_scale(snr) * options.v_pred_like_loss
    if options.debiased_estimation_loss:
        loss = loss * debiased_weight(snr, options.v_parameterization)
    return loss


def training_loss(pred: Tensor, target: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, snr_table: Tensor,
                  options: LossOptions, loss_weights: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The scalar loss of one batch: element-wise → mask → per-sample mean → loss weights → post-weights → mean."""
    c = None
    if options.loss_type in ("huber", "smooth_l1"):
        c = huber_c(timesteps, options.huber_schedule, options.huber_c, options.huber_scale, alphas_cumprod)
    loss = elementwise_loss(pred, target, options.loss_type, c)
    if mask is not None:
        loss = apply_mask(loss, mask)
    loss = per_sample_mean(loss)
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    loss = post_weights(loss, snr_table[timesteps.to("cpu")], options)
    return loss.mean()
