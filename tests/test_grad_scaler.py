"""fp16 loss scaling (`lorakit.train.grad_scaler`), run on the CPU with torch's own GradScaler: gradients that
underflow in fp16 survive, an overflow skips the step and halves the scale, --full_fp16's fp16 gradients can be
unscaled, and the scaler's state goes through a state folder unchanged."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train.grad_scaler import gradient_scaler
from lorakit.train.resume import restore
from lorakit.train.state import read_state, rng_json, write_state


def fp16_scaler(full_fp16: bool = False) -> torch.amp.GradScaler:
    return gradient_scaler("fp16", full_fp16=full_fp16, fused_backward_pass=False, device_type="cpu")


def sgd_step(weight: torch.nn.Parameter, scaler: torch.amp.GradScaler, factor: float) -> torch.Tensor:
    """One SGD step (lr 1) on sum(w * factor) * factor, the product in fp16 like an autocast region, the loss in
    fp32 like the training loss; returns the unscaled gradient the step used."""
    optimizer = torch.optim.SGD([weight], lr=1.0)
    weight.grad = None
    loss = (weight.half() * factor).float().sum() * factor
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad = weight.grad.clone()
    scaler.step(optimizer)
    scaler.update()
    return grad


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_without_fp16_the_scaler_is_disabled_and_passes_through(precision):
    scaler = gradient_scaler(precision, full_fp16=False, fused_backward_pass=True, device_type="cpu")
    assert not scaler.is_enabled()
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss and scaler.state_dict() == {}


def test_fp16_gradients_that_underflow_survive_scaling():
    plain = gradient_scaler("no", full_fp16=False, fused_backward_pass=False, device_type="cpu")
    # d/dw = 1e-8, below fp16's smallest subnormal (6e-8): no gradient at all without scaling
    assert torch.equal(sgd_step(torch.nn.Parameter(torch.ones(4)), plain, 1e-4), torch.zeros(4))
    scaled = sgd_step(torch.nn.Parameter(torch.ones(4)), fp16_scaler(), 1e-4)
    assert scaled.tolist() == pytest.approx([1e-8] * 4, rel=1e-3)


def test_an_overflow_skips_the_step_and_halves_the_scale():
    weight = torch.nn.Parameter(torch.ones(4))
    scaler = fp16_scaler()
    sgd_step(weight, scaler, 1e3)  # 1e6 x 65536 overflows fp16
    assert torch.equal(weight.detach(), torch.ones(4))
    assert scaler.get_scale() == 2.0**15


def test_full_fp16_unscales_fp16_gradients():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    with pytest.raises(ValueError, match="unscale FP16 gradients"):  # why --full_fp16 needs its own scaler
        scaler = fp16_scaler()
        scaler.scale((weight.float() * 0.25).sum()).backward()
        scaler.unscale_(optimizer)
    weight.grad = None
    scaler = fp16_scaler(full_fp16=True)
    scaler.scale((weight.float() * 0.25).sum()).backward()
    assert torch.equal(weight.grad, torch.full((4,), 0.25 * 2**16, dtype=torch.float16))
    scaler.unscale_(optimizer)
    assert torch.equal(weight.grad, torch.full((4,), 0.25, dtype=torch.float16))


def test_fp16_with_fused_backward_is_refused_with_the_reason():
    with pytest.raises(LorakitError, match=r"^--fused_backward_pass with --mixed_precision fp16: .* bf16"):
        gradient_scaler("fp16", full_fp16=False, fused_backward_pass=True, device_type="cpu")


def test_the_scaler_state_goes_through_a_state_folder(tmp_path):
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = fp16_scaler()
    weight = torch.nn.Parameter(torch.ones(4))
    sgd_step(weight, scaler, 1e3)  # overflow: scale 2**15
    sgd_step(weight, scaler, 1e-2)  # a good step: growth tracker 1
    progress = {"global_step": 2, "epoch": 1}
    write_state(tmp_path / "state", network=network, optimizer=optimizer, lr_scheduler=lr_scheduler,
                rng=[rng_json()], progress=progress, scaler=scaler)
    state = read_state(tmp_path / "state")
    assert state.scaler == scaler.state_dict() == {"scale": 2.0**15, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                   "growth_interval": 2000, "_growth_tracker": 1}
    resumed = fp16_scaler()
    restore(state, network, optimizer, lr_scheduler, resumed, rank=0)
    assert resumed.state_dict() == scaler.state_dict()

    write_state(tmp_path / "plain", network=network, optimizer=optimizer, lr_scheduler=lr_scheduler,
                rng=[rng_json()], progress=progress)
    assert read_state(tmp_path / "plain").scaler == {}
    assert not (tmp_path / "plain" / "scaler.json").exists()  # states of bf16 / fp32 runs are as before


def test_a_step_the_scaler_skips_does_not_advance_the_lr_schedule():
    from types import SimpleNamespace

    from lorakit.train.optimizers import build_optimizer
    from lorakit.train.trainer import Optimization, optimizer_step

    weight = torch.nn.Parameter(torch.ones(4))
    built = build_optimizer("SGDNesterov", [weight], 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(built.optimizer, lambda step: 1.0 / (step + 1))
    opt = Optimization(built, schedule, fp16_scaler(), [weight], ["unet"])
    config = SimpleNamespace(fused_backward_pass=False, max_grad_norm=0.0, scale_weight_norms=None)
    for factor, expected_lr in ((1e3, 1.0), (1.0, 0.5)):  # an overflow (skipped), then a real step
        opt.scaler.scale((weight.half() * factor).float().sum() * factor).backward()
        optimizer_step(opt, None, config, world=1, device="cpu")
        assert schedule.get_last_lr() == [expected_lr]
