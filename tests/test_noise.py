"""Noise schedule, noise options, timesteps and targets against diffusers and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from lorakit.errors import LorakitError
from lorakit.train import noise as N


def _ddpm(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, **kwargs)


def _latents(seed: int = 0, shape=(2, 4, 8, 6)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_scaled_linear_schedule_matches_hand_values_and_diffusers():
    schedule = N.noise_schedule()
    assert schedule.betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert schedule.betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    assert schedule.betas[500].item() == pytest.approx((lo + 500 / 999 * (hi - lo)) ** 2, rel=1e-6)
    assert schedule.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-7)
    expected_last = math.prod(1 - (lo + t / 999 * (hi - lo)) ** 2 for t in range(1000))
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(expected_last, rel=1e-4)
    reference = _ddpm()
    assert torch.equal(schedule.betas, reference.betas)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)
    snr_500 = reference.alphas_cumprod[500].item() / (1 - reference.alphas_cumprod[500].item())
    assert schedule.snr[500].item() == pytest.approx(snr_500, rel=1e-5)


def test_zero_terminal_snr_schedule_and_snr_table_from_fixed_schedule():
    original = N.noise_schedule()
    fixed = N.noise_schedule(zero_terminal_snr=True)
    assert fixed.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert fixed.alphas_cumprod[0].item() == pytest.approx(original.alphas_cumprod[0].item(), rel=1e-6)
    assert fixed.snr[-1].item() == 0.0
    reference = _ddpm(rescale_betas_zero_snr=True)
    torch.testing.assert_close(fixed.alphas_cumprod, reference.alphas_cumprod, rtol=1e-6, atol=1e-9)
    a = fixed.alphas_cumprod[700].item()
    assert fixed.snr[700].item() == pytest.approx(a / (1 - a), rel=1e-5)
    assert fixed.snr[700].item() < original.snr[700].item() * 0.99  # not the unfixed table sd-scripts keeps


def test_offset_noise_adds_exactly_offset_times_channel_normal():
    latents = _latents()
    out = N.offset_noise(torch.zeros_like(latents), latents, 0.1, torch.Generator().manual_seed(7))
    expected = 0.1 * torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, expected.expand_as(latents), rtol=0, atol=0)


def test_adaptive_noise_scale_uses_abs_channel_mean_and_clamps_at_zero():
    means = torch.tensor([0.5, -0.2, 0.0, -2.0])
    latents = means.reshape(1, 4, 1, 1).expand(1, 4, 3, 3).clone()
    draw = torch.randn((1, 4, 1, 1), generator=torch.Generator().manual_seed(3)).reshape(4)
    out = N.offset_noise(torch.zeros_like(latents), latents, 0.1, torch.Generator().manual_seed(3), 0.5)
    strengths = [0.1 + 0.5 * abs(m) for m in means.tolist()]  # 0.35, 0.2, 0.1, 1.1
    for ch in range(4):
        assert out[0, ch, 0, 0].item() == pytest.approx(strengths[ch] * draw[ch].item(), rel=1e-6)
    negative = N.offset_noise(torch.zeros_like(latents), latents, 0.1, torch.Generator().manual_seed(3), -0.2)
    # o = max(0.1 - 0.2|m|, 0): channel 3 (|m| = 2) is clamped to 0, channel 2 keeps 0.1.
    assert negative[0, 3].abs().max().item() == 0.0
    assert negative[0, 2, 0, 0].item() == pytest.approx(0.1 * draw[2].item(), rel=1e-6)


def test_multires_noise_shape_unit_std_and_first_level_formula():
    noise = _latents(1, (2, 4, 32, 24))
    out = N.multires_noise(noise, 6, 0.3, torch.Generator().manual_seed(5))
    assert out.shape == noise.shape
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    # One iteration: r⁰ = 1, so exactly one full-size N(0,1) after one U(0,1) draw; then divided by the std.
    g = torch.Generator().manual_seed(5)
    torch.rand((), generator=g)
    added = noise + torch.randn(noise.shape, generator=g)
    torch.testing.assert_close(N.multires_noise(noise, 1, 0.3, torch.Generator().manual_seed(5)),
                               added / added.std())


def test_timesteps_in_half_open_range_and_min_equals_max():
    t = N.sample_timesteps(4000, 100, 200, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min().item() == 100 and t.max().item() == 199
    assert N.sample_timesteps(3, 500, 500, torch.Generator()).tolist() == [500, 500, 500]
    with pytest.raises(LorakitError, match="--min_timestep"):
        N.NoiseOptions(min_timestep=600, max_timestep=500)


def test_add_noise_and_v_target_match_diffusers():
    schedule, reference = N.noise_schedule(), _ddpm()
    latents, noise = _latents(2), _latents(3)
    t = torch.tensor([0, 999])
    torch.testing.assert_close(N.add_noise(latents, noise, t, schedule.alphas_cumprod),
                               reference.add_noise(latents, noise, t), rtol=0, atol=0)
    torch.testing.assert_close(N.v_target(latents, noise, t, schedule.alphas_cumprod),
                               reference.get_velocity(latents, noise, t), rtol=0, atol=0)
    a = schedule.alphas_cumprod[999].item()
    v = N.v_target(latents, noise, t, schedule.alphas_cumprod)[1]
    torch.testing.assert_close(v, math.sqrt(a) * noise[1] - math.sqrt(1 - a) * latents[1])


def test_ip_noise_changes_x_t_but_not_the_target_noise():
    schedule, latents = N.noise_schedule(), _latents(4)
    plain = N.noisy_batch(latents, schedule, N.NoiseOptions(), torch.Generator().manual_seed(9))
    perturbed = N.noisy_batch(latents, schedule, N.NoiseOptions(ip_noise_gamma=0.1), torch.Generator().manual_seed(9))
    assert torch.equal(plain.noise, perturbed.noise) and torch.equal(plain.timesteps, perturbed.timesteps)
    assert not torch.allclose(plain.noisy_latents, perturbed.noisy_latents)
    # Reproduce the documented draw order: ε, timesteps, then the perturbation.
    g = torch.Generator().manual_seed(9)
    eps = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    extra = torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(perturbed.noisy_latents,
                               N.add_noise(latents, eps + 0.1 * extra, t, schedule.alphas_cumprod))


def test_noisy_batch_draw_order_with_every_option():
    schedule, latents = N.noise_schedule(), _latents(6, (1, 4, 8, 8))
    options = N.NoiseOptions(noise_offset=0.05, noise_offset_random_strength=True, multires_noise_iterations=2,
                             multires_noise_discount=0.3, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                             min_timestep=10, max_timestep=20)
    batch = N.noisy_batch(latents, schedule, options, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(latents.shape, generator=g)
    eps = eps + 0.05 * torch.rand((), generator=g).item() * torch.randn((1, 4, 1, 1), generator=g)
    eps = N.multires_noise(eps, 2, 0.3, g)
    t = torch.randint(10, 20, (1,), generator=g)
    gamma = 0.1 * torch.rand((), generator=g).item()
    x_t = N.add_noise(latents, eps + gamma * torch.randn(latents.shape, generator=g), t, schedule.alphas_cumprod)
    torch.testing.assert_close(batch.noise, eps)
    assert batch.timesteps.tolist() == t.tolist()
    torch.testing.assert_close(batch.noisy_latents, x_t)
