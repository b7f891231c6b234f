"""Loss types, Huber schedules, masks and per-sample weights against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train import loss as L
from lorakit.train.noise import noise_schedule

SCHEDULE = noise_schedule()
ALPHAS = SCHEDULE.alphas_cumprod.double()


def _snr(t: int) -> float:
    a = ALPHAS[t].item()
    return a / (1 - a)


def test_l2_and_l1_elementwise():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[1.5, 0.0], [3.0, 7.0]]]])
    assert L.elementwise_loss(pred, target, "l2").flatten().tolist() == [0.25, 4.0, 0.0, 9.0]
    assert L.elementwise_loss(pred, target, "l1").flatten().tolist() == [0.5, 2.0, 0.0, 3.0]
    with pytest.raises(LorakitError, match="--loss_type"):
        L.elementwise_loss(pred, target, "l3")


def test_huber_and_smooth_l1_at_known_c():
    # c = 0.5, |p−y| = 1.2: √(1.44 + 0.25) = 1.3 → smooth_l1 = 2(1.3 − 0.5) = 1.6, huber = c·1.6 = 0.8.
    pred, target = torch.full((2, 1, 1, 1), 1.2), torch.zeros(2, 1, 1, 1)
    c = torch.tensor([0.5, 1.0])
    smooth = L.elementwise_loss(pred, target, "smooth_l1", c).flatten()
    huber = L.elementwise_loss(pred, target, "huber", c).flatten()
    second = 2 * (math.sqrt(1.44 + 1.0) - 1.0)
    assert smooth.tolist() == pytest.approx([1.6, second], rel=1e-6)
    assert huber.tolist() == pytest.approx([0.8, second], rel=1e-6)
    # Near zero the Huber loss is quadratic: 2c(√(d²+c²)−c) ≈ d².
    small = L.elementwise_loss(torch.full((1, 1, 1, 1), 0.05), torch.zeros(1, 1, 1, 1), "huber", torch.tensor([1.0]))
    assert small.item() == pytest.approx(0.0025, rel=1e-3)


def test_huber_schedules_at_three_timesteps():
    t = torch.tensor([0, 500, 999])
    const = L.huber_c(t, "constant", 0.1, 2.0, SCHEDULE.alphas_cumprod)
    assert const.tolist() == pytest.approx([0.2, 0.2, 0.2])
    expo = L.huber_c(t, "exponential", 0.1, 1.5, SCHEDULE.alphas_cumprod)
    assert expo.tolist() == pytest.approx([1.5, 1.5 * 0.1**0.5, 1.5 * 0.1**0.999], rel=1e-6)
    snr = L.huber_c(t, "snr", 0.1, 7.0, SCHEDULE.alphas_cumprod)  # scale is not used by "snr"
    expected = []
    for step in (0, 500, 999):
        a = ALPHAS[step].item()
        sigma = math.sqrt((1 - a) / a)
        expected.append(0.9 / (1 + sigma) ** 2 + 0.1)
    assert snr.tolist() == pytest.approx(expected, rel=1e-5)
    assert expected[0] > 0.8 and expected[2] < 0.12  # big c at low noise, c → huber_c at high noise


def test_masked_loss_is_area_resized_and_multiplied():
    loss = torch.ones(1, 4, 4, 4)
    half = torch.zeros(1, 1, 8, 8)
    half[..., :4] = 1.0
    assert L.per_sample_mean(L.apply_mask(loss, half)).item() == pytest.approx(0.5)
    sparse = torch.zeros(1, 1, 8, 8)
    sparse[..., ::2, ::2] = 1.0  # one pixel in each 2×2 block → area average 0.25 everywhere
    masked = L.apply_mask(loss, sparse)
    assert torch.allclose(masked, torch.full_like(masked, 0.25))


def test_min_snr_weights_eps_and_v_at_two_timesteps():
    snr = SCHEDULE.snr[torch.tensor([0, 999])]
    s0, s999 = _snr(0), _snr(999)
    assert s0 > 1000 and s999 < 5
    eps = L.min_snr_weight(snr, 5.0, v_prediction=False)
    assert eps.tolist() == pytest.approx([5 / s0, 1.0], rel=1e-5)
    v = L.min_snr_weight(snr, 5.0, v_prediction=True)
    assert v.tolist() == pytest.approx([5 / (s0 + 1), s999 / (s999 + 1)], rel=1e-5)
    # Zero-terminal SNR: SNR = 0 gives the limit weight 1 for ε, not 0/0.
    assert L.min_snr_weight(torch.tensor([0.0]), 5.0, False).item() == 1.0


def test_post_weights_scale_v_pred_v_pred_like_and_debiased():
    t = torch.tensor([0, 600])
    snr = SCHEDULE.snr[t]
    s600 = _snr(600)
    ones = torch.ones(2)
    scaled = L.post_weights(ones, snr, L.LossOptions(scale_v_pred_loss_like_noise_pred=True))
    assert scaled.tolist() == pytest.approx([1000 / 1001, s600 / (s600 + 1)], rel=1e-5)  # SNR′ = min(SNR, 1000)
    like = L.post_weights(ones, snr, L.LossOptions(v_pred_like_loss=0.2))
    assert like.tolist() == pytest.approx([1 + 0.2 * 1001 / 1000, 1 + 0.2 * (s600 + 1) / s600], rel=1e-5)
    debiased = L.post_weights(ones, snr, L.LossOptions(debiased_estimation_loss=True))
    assert debiased.tolist() == pytest.approx([1 / math.sqrt(1000), 1 / math.sqrt(s600)], rel=1e-5)
    debiased_v = L.post_weights(ones, snr, L.LossOptions(debiased_estimation_loss=True, v_parameterization=True))
    assert debiased_v.tolist() == pytest.approx([1 / 1001, 1 / (s600 + 1)], rel=1e-5)
    # Order: Min-SNR first, then debiased, multiplied.
    both = L.post_weights(ones, snr, L.LossOptions(min_snr_gamma=5.0, debiased_estimation_loss=True))
    assert both[1].item() == pytest.approx(min(s600, 5) / s600 / math.sqrt(s600), rel=1e-5)


def test_training_loss_with_prior_loss_weight_and_min_snr():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 2.0)])
    t = torch.tensor([0, 600])
    options = L.LossOptions(min_snr_gamma=5.0)
    value = L.training_loss(pred, target, t, SCHEDULE.alphas_cumprod, SCHEDULE.snr, options,
                            loss_weights=torch.tensor([1.0, 0.5]))
    s0, s600 = _snr(0), _snr(600)
    expected = (1.0 * 1.0 * 5 / s0 + 4.0 * 0.5 * min(s600, 5) / s600) / 2
    assert value.item() == pytest.approx(expected, rel=1e-5)
    plain = L.training_loss(pred, target, t, SCHEDULE.alphas_cumprod, SCHEDULE.snr, L.LossOptions())
    assert plain.item() == pytest.approx(2.5)


def test_training_loss_huber_with_mask():
    pred, target = torch.full((1, 1, 2, 2), 1.2), torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    options = L.LossOptions(loss_type="huber", huber_schedule="constant", huber_c=0.5)
    value = L.training_loss(pred, target, torch.tensor([10]), SCHEDULE.alphas_cumprod, SCHEDULE.snr, options,
                            mask=mask)
    assert value.item() == pytest.approx(0.8 / 4, rel=1e-6)
