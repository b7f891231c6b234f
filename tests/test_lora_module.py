"""LoRA module math against hand-written formulas: multiplier, alpha/rank, conv stride/padding, merge, dropouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lorakit.network.module import LoRAModule


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return module


def with_random_up(lora: LoRAModule, seed: int = 1) -> LoRAModule:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator))
    return lora


def test_linear_branch_is_up_down_times_multiplier_alpha_over_rank():
    base = seeded(nn.Linear(6, 5))
    lora = with_random_up(LoRAModule("lora_x", base, rank=3, alpha=1.5))
    x = torch.randn(2, 4, 6)
    expected_branch = x @ lora.lora_down.weight.T @ lora.lora_up.weight.T * (1.5 / 3)
    lora.attach()
    with torch.no_grad():
        torch.testing.assert_close(base(x), F.linear(x, base.weight, base.bias) + expected_branch)
        lora.multiplier = 0.25
        torch.testing.assert_close(base(x), F.linear(x, base.weight, base.bias) + 0.25 * expected_branch)
        lora.multiplier = 0.0
        assert torch.equal(base(x), F.linear(x, base.weight, base.bias))
    lora.detach()
    lora.multiplier = 1.0
    assert torch.equal(base(x), F.linear(x, base.weight, base.bias))


def test_init_down_kaiming_up_zero_and_alpha_default_is_rank():
    base = nn.Linear(64, 32)
    lora = LoRAModule("lora_x", base, rank=4, alpha=None)
    assert lora.scale == 1.0 and float(lora.alpha) == 4.0
    assert LoRAModule("lora_y", base, rank=4, alpha=0).scale == 1.0
    assert torch.count_nonzero(lora.lora_up.weight) == 0
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt 5) on fan_in 64
    assert lora.lora_down.weight.abs().max() <= bound and lora.lora_down.weight.std() > bound / 3


def test_network_state_dict_holds_only_lora_tensors_and_base_stays_clean():
    model = nn.Sequential(nn.Linear(4, 4))
    keys = set(model.state_dict())
    lora = LoRAModule("lora_x", model[0], rank=2, alpha=1)
    lora.attach()
    assert set(lora.state_dict()) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert set(model.state_dict()) == keys
    assert {id(p) for p in lora.parameters()}.isdisjoint(id(p) for p in model.parameters())


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv_branch_keeps_kernel_stride_padding_and_merges_exactly(kernel, stride, padding):
    base = seeded(nn.Conv2d(4, 6, kernel, stride=stride, padding=padding))
    lora = with_random_up(LoRAModule("lora_c", base, rank=2, alpha=1.0))
    assert lora.lora_down.stride == (stride, stride) and lora.lora_down.padding == (padding, padding)
    assert lora.lora_up.kernel_size == (1, 1)
    x = torch.randn(2, 4, 9, 9)
    expected = (F.conv2d(x, base.weight, base.bias, stride, padding)
                + 0.5 * F.conv2d(F.conv2d(x, lora.lora_down.weight, None, stride, padding), lora.lora_up.weight))
    lora.attach()
    with torch.no_grad():
        hooked = base(x)
        torch.testing.assert_close(hooked, expected)
        lora.merge()
        assert not lora.attached
        torch.testing.assert_close(base(x), hooked, atol=1e-5, rtol=1e-5)


def test_loading_an_alpha_changes_the_scale():
    lora = LoRAModule("lora_x", nn.Linear(3, 3), rank=4, alpha=4)
    lora.load_state_dict({"lora_down.weight": lora.lora_down.weight, "lora_up.weight": lora.lora_up.weight,
                          "alpha": torch.tensor(1.0)})
    assert lora.scale == 0.25


def test_dropouts_act_in_training_only():
    base = seeded(nn.Linear(8, 8))
    plain = with_random_up(LoRAModule("lora_a", base, rank=4, alpha=2))
    noisy = with_random_up(LoRAModule("lora_b", base, rank=4, alpha=2, dropout=0.5, rank_dropout=0.5,
                                      module_dropout=0.5))
    noisy.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8)
    plain.eval(), noisy.eval()
    with torch.no_grad():
        assert torch.equal(noisy(x), plain(x))
        noisy.train()
        torch.manual_seed(0)
        assert any(not torch.equal(noisy(x), plain(x)) for _ in range(5))


def test_rank_dropout_is_unbiased_and_module_dropout_skips_at_its_rate():
    base = seeded(nn.Linear(8, 8))
    lora = with_random_up(LoRAModule("lora_r", base, rank=4, alpha=4, rank_dropout=0.5))
    x = torch.randn(1, 8).expand(4000, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        lora.train()
        mean = lora(x).mean(0)
        lora.eval()
        torch.testing.assert_close(mean, lora(x[:1])[0], atol=0.15 * lora(x[:1]).abs().max().item(), rtol=0)
    skipper = with_random_up(LoRAModule("lora_m", base, rank=4, alpha=4, module_dropout=0.3)).train()
    with torch.no_grad():
        skipped = sum(bool(torch.count_nonzero(skipper(x[:1])) == 0) for _ in range(1000))
    assert 240 <= skipped <= 360
