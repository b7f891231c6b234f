"""The forward-diffusion half of a training step: the DDPM schedule, noise, timesteps and x_t.

Pure functions on tensors, as sd-scripts' `train_network.py` `process_batch`,
`library/train_util.py` `get_noise_noisy_latents_and_timesteps` and `library/custom_train_functions.py`.

Randomness: every draw comes from one explicit CPU `torch.Generator`, in float32, then moves to the latents'
device and dtype, so a resumed run that restores the generator's state draws the same numbers. The order of draws
in one step, made by `noisy_batch` (an option that is off draws nothing):
  1. ε = N(0,1) of the latents' shape;
  2. offset noise: U(0,1) strength (only with random strength), then N(0,1) of shape [B, C, 1, 1];
  3. multires noise, per iteration i: one U(0,1) for r = 2 + 2u, then N(0,1) of shape [B, C, ⌊H/rⁱ⌋, ⌊W/rⁱ⌋];
  4. timesteps: B integers in [min_timestep, max_timestep) (none when min == max);
  5. input perturbation: U(0,1) strength (only with random strength), then N(0,1) of the latents' shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.errors import LorakitError

NUM_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM tensors indexed by timestep (float32, CPU): β_t, ᾱ_t and SNR_t = ᾱ_t / (1 − ᾱ_t)."""

    betas: Tensor
    alphas_cumprod: Tensor
    snr: Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def scaled_linear_betas(num_timesteps: int = NUM_TIMESTEPS, beta_start: float = BETA_START,
                        beta_end: float = BETA_END) -> Tensor:
    """β_t = (√β_start + t/(T−1)·(√β_end − √β_start))², as diffusers' "scaled_linear" (float32)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2


def zero_terminal_snr_betas(betas: Tensor) -> Tensor:
    """Rescale betas so that √ᾱ ends at 0 (SNR_T = 0) and keeps its first value (Lin et al. 2023, Alg. 1)."""
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * (first / (first - last))
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def snr_table(alphas_cumprod: Tensor) -> Tensor:
    """SNR_t = ᾱ_t / (1 − ᾱ_t), computed as (√ᾱ/√(1−ᾱ))² like sd-scripts' `all_snr`."""
    return (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2


def noise_schedule(zero_terminal_snr: bool = False, num_timesteps: int = NUM_TIMESTEPS,
                   beta_start: float = BETA_START, beta_end: float = BETA_END) -> NoiseSchedule:
    """The SDXL training schedule (scaled-linear 0.00085–0.012 over 1000 steps), optionally zero-terminal-SNR."""
    betas = scaled_linear_betas(num_timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = zero_terminal_snr_betas(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    # sd-scripts keeps the SNR table of the unfixed schedule here; we take it from the schedule actually used.
    return NoiseSchedule(betas=betas, alphas_cumprod=alphas_cumprod, snr=snr_table(alphas_cumprod))


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float32))


def random_strength(value: float, generator: torch.Generator) -> float:
    """`value × U(0,1)`: the `--*_random_strength` variants draw one number per step."""
    return value * _uniform(generator)


def offset_noise(noise: Tensor, latents: Tensor, offset: float, generator: torch.Generator,
                 adaptive_scale: float | None = None) -> Tensor:
    """ε + o·N(0,1)[B,C,1,1]; with an adaptive scale s, o = max(o + s·|mean_HW(latents)|, 0) per sample/channel."""
    strength: float | Tensor = offset
    if adaptive_scale is not None:
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(offset + adaptive_scale * channel_mean, min=0.0)
    return noise + strength * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, noise)


def multires_noise(noise: Tensor, iterations: int, discount: float, generator: torch.Generator) -> Tensor:
    """Pyramid noise: add bilinear-upsampled N(0,1) at scales r⁻ⁱ (r ~ U(2,4)) times discountⁱ, then unit std."""
    batch, channels, height, width = noise.shape
    for i in range(iterations):
        r = 2.0 + 2.0 * _uniform(generator)
        small_h, small_w = max(1, int(height / r**i)), max(1, int(width / r**i))
        small = _randn((batch, channels, small_h, small_w), generator, noise)
        noise = noise + torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear") * discount**i
        if small_h == 1 or small_w == 1:
            break
    return noise / noise.std()


def sample_timesteps(batch_size: int, min_timestep: int, max_timestep: int, generator: torch.Generator) -> Tensor:
    """B integer timesteps, uniform in [min_timestep, max_timestep); all equal max_timestep when min == max."""
    if min_timestep == max_timestep:
        # sd-scripts trains at t = max here; t = 1000 is not a timestep, so the last one is used instead.
        return torch.full((batch_size,), min(max_timestep, NUM_TIMESTEPS - 1), dtype=torch.long)
    return torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator)


def _per_sample(values: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    picked = values.to(like.device, like.dtype)[timesteps.to(like.device)]
    return picked.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, as diffusers' `DDPMScheduler.add_noise` (computed in the latents' dtype)."""
    alphas = _per_sample(alphas_cumprod, timesteps, latents)
    return alphas.sqrt() * latents + (1.0 - alphas).sqrt() * noise


def v_target(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The v-prediction target √ᾱ_t·ε − √(1−ᾱ_t)·x₀."""
    alphas = _per_sample(alphas_cumprod, timesteps, latents)
    return alphas.sqrt() * noise - (1.0 - alphas).sqrt() * latents


@dataclass(frozen=True)
class NoiseOptions:
    """The noise flags of one run (None / 0 = off), as sd-scripts names them."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = NUM_TIMESTEPS

    def __post_init__(self) -> None:
        if not 0 <= self.min_timestep <= self.max_timestep <= NUM_TIMESTEPS:
            raise LorakitError(f"--min_timestep {self.min_timestep} / --max_timestep {self.max_timestep}: "
                               f"expected 0 <= min_timestep <= max_timestep <= {NUM_TIMESTEPS}")


@dataclass(frozen=True)
class NoisyBatch:
    """What a step feeds the U-Net (x_t, t) and what the ε target is built from (the noise without ip_noise)."""

    noise: Tensor
    timesteps: Tensor
    noisy_latents: Tensor


def noisy_batch(latents: Tensor, schedule: NoiseSchedule, options: NoiseOptions,
                generator: torch.Generator) -> NoisyBatch:
    """Draw noise and timesteps for one batch in the documented order and make x_t."""
    noise = _randn(tuple(latents.shape), generator, latents)
    if options.noise_offset:
        offset = options.noise_offset
        if options.noise_offset_random_strength:
            offset = random_strength(offset, generator)
        noise = offset_noise(noise, latents, offset, generator, options.adaptive_noise_scale)
    if options.multires_noise_iterations:
        noise = multires_noise(noise, options.multires_noise_iterations, options.multires_noise_discount, generator)
    timesteps = sample_timesteps(latents.shape[0], options.min_timestep, options.max_timestep, generator)
    input_noise = noise
    if options.ip_noise_gamma:
        gamma = options.ip_noise_gamma
        if options.ip_noise_gamma_random_strength:
            gamma = random_strength(gamma, generator)
        input_noise = noise + gamma * _randn(tuple(latents.shape), generator, latents)
    noisy = add_noise(latents, input_noise, timesteps, schedule.alphas_cumprod)
    return NoisyBatch(noise=noise, timesteps=timesteps.to(latents.device), noisy_latents=noisy)

