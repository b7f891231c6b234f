"""Fused backward: per-parameter steps in gradient hooks give the same weights as the ordinary optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train.fused import fuse_backward
from lorakit.train.optimizers import build_optimizer
from lorakit.train.schedulers import build_scheduler

STEPS = 5


class TinyLoRA(torch.nn.Module):
    """Two frozen linear layers with trainable low-rank updates (like a LoRA network), one 8-bit-sized pair."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base1, self.base2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 16)
        self.base1.requires_grad_(False)
        self.base2.requires_grad_(False)
        self.down1, self.up1 = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 128, bias=False)
        self.down2, self.up2 = torch.nn.Linear(128, 4, bias=False), torch.nn.Linear(4, 16, bias=False)
        for up in (self.up1, self.up2):  # non-zero so that every parameter gets a gradient from step 1
            torch.nn.init.normal_(up.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.base1(x) + self.up1(self.down1(x)))
        return self.base2(h) + self.up2(self.down2(h))

    def groups(self, lr1: float, lr2: float) -> list[dict]:
        return [{"params": [self.down1.weight, self.up1.weight], "lr": lr1},
                {"params": [self.down2.weight, self.up2.weight], "lr": lr2}]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 64, generator=g), torch.randn(8, 16, generator=g)) for _ in range(STEPS)]


def _loss(model: TinyLoRA, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _train(name: str, args: list[str], fused: bool, scheduler: str = "linear", max_grad_norm: float = 0.0,
           per_parameter_clip: bool = False) -> tuple[TinyLoRA, torch.optim.Optimizer]:
    model = TinyLoRA()
    built = build_optimizer(name, model.groups(1e-2, 3e-3), 1e-2, args, lr_scheduler=scheduler)
    lr_scheduler = build_scheduler(built.optimizer, built.lr_scheduler or scheduler, max_train_steps=STEPS,
                                   warmup_steps=0 if built.lr_scheduler or scheduler == "constant" else 2)
    if fused:
        fuse_backward(built.optimizer, built.make, max_grad_norm=max_grad_norm)
    params = [p for group in built.optimizer.param_groups for p in group["params"]]
    for batch in _batches():
        _loss(model, batch).backward()
        if fused:
            assert all(p.grad is None for p in params)
        else:
            if per_parameter_clip:
                for p in params:
                    torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
            built.optimizer.step()
            built.optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
    return model, built.optimizer


@pytest.mark.parametrize("name, args, scheduler", [
    ("Adafactor", [], "constant"),  # relative_step: the adafactor scheduler is forced
    ("Adafactor", ["relative_step=False", "scale_parameter=False", "warmup_init=False"], "cosine"),
    ("AdamW", ["weight_decay=0.1"], "linear"),
    ("Lion", [], "cosine"),
    ("SGDNesterov", [], "linear"),
    ("AdamW8bit", [], "linear"),
])
def test_fused_weights_equal_unfused(name, args, scheduler):
    reference, _ = _train(name, args, fused=False, scheduler=scheduler)
    fused, _ = _train(name, args, fused=True, scheduler=scheduler)
    start = TinyLoRA()
    for (key, expected), got, initial in zip(reference.state_dict().items(), fused.state_dict().values(),
                                             start.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=f"{name}: {key}")
        if "down" in key or "up" in key:
            assert not torch.equal(got, initial), f"{key} never moved"


def test_fused_optimizer_state_lives_in_the_main_optimizer():
    _, optimizer = _train("Adafactor", [], fused=True, scheduler="constant")
    state = optimizer.state_dict()["state"]
    assert sorted(state) == [0, 1, 2, 3]
    assert all(entry["step"] == STEPS for entry in state.values())


def test_fused_resume_from_state_dicts_continues_exactly():
    straight, _ = _train("AdamW", [], fused=True)

    def setup(model: TinyLoRA):
        built = build_optimizer("AdamW", model.groups(1e-2, 3e-3), 1e-2)
        scheduler = build_scheduler(built.optimizer, "linear", max_train_steps=STEPS, warmup_steps=2)
        fuse_backward(built.optimizer, built.make)
        return built.optimizer, scheduler

    first = TinyLoRA()
    optimizer, scheduler = setup(first)
    batches = _batches()
    for batch in batches[:3]:
        _loss(first, batch).backward()
        scheduler.step()
    resumed = TinyLoRA()
    resumed.load_state_dict(first.state_dict())
    optimizer2, scheduler2 = setup(resumed)
    optimizer2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    scheduler2.load_state_dict(scheduler.state_dict())
    for batch in batches[3:]:
        _loss(resumed, batch).backward()
        scheduler2.step()
    for expected, got in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fused_clips_each_parameter_by_its_own_norm():
    reference, _ = _train("AdamW", [], fused=False, max_grad_norm=0.01, per_parameter_clip=True)
    fused, _ = _train("AdamW", [], fused=True, max_grad_norm=0.01)
    globally_clipped, _ = _train("AdamW", [], fused=False)
    for expected, got in zip(reference.state_dict().values(), fused.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(globally_clipped.up1.weight, fused.up1.weight)


def test_fused_refusals_give_the_reason():
    model = TinyLoRA()
    built = build_optimizer("AdamW", model.groups(1e-3, 1e-3), 1e-3)
    with pytest.raises(LorakitError, match="--gradient_accumulation_steps 4: each parameter steps as soon"):
        fuse_backward(built.optimizer, built.make, gradient_accumulation_steps=4)
    with pytest.raises(LorakitError, match="2 processes"):
        fuse_backward(built.optimizer, built.make, num_processes=2)
    for name in ("Prodigy", "DAdaptAdam", "AdamWScheduleFree"):
        other = build_optimizer(name, TinyLoRA().groups(1.0, 1.0), 1.0)
        with pytest.raises(LorakitError, match="cannot step one parameter at a time"):
            fuse_backward(other.optimizer, other.make)


def test_remove_restores_ordinary_gradients():
    model = TinyLoRA()
    built = build_optimizer("AdamW", model.groups(1e-3, 1e-3), 1e-3)
    hooks = fuse_backward(built.optimizer, built.make)
    hooks.remove()
    before = copy.deepcopy(model.up1.weight.detach())
    _loss(model, _batches()[0]).backward()
    assert model.up1.weight.grad is not None and torch.equal(model.up1.weight.detach(), before)
