"""LR schedulers: the learning rate at chosen steps against hand-computed formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train.optimizers import build_optimizer
from lorakit.train.schedulers import build_scheduler, steps_from

LR = 1e-3


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=LR)


def _lrs(name: str, steps: list[int], **kwargs) -> list[float]:
    """The LR in effect at each optimizer step in `steps` (0 = the first step)."""
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, name, **kwargs)
    seen = {}
    for step in range(max(steps) + 1):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return [seen[s] for s in steps]


def _cos(progress: float, cycles: float = 0.5) -> float:
    return 0.5 * (1 + math.cos(math.pi * 2 * cycles * progress))


STEPS = [0, 5, 10, 40, 99]
CASES = {
    # name: (kwargs, factor(step)) with 100 total steps and 10 warm-up steps where a warm-up is used
    "constant": ({}, lambda s: 1.0),
    "constant_with_warmup": ({"warmup_steps": 10}, lambda s: min(s / 10, 1.0)),
    "linear": ({"warmup_steps": 10}, lambda s: s / 10 if s < 10 else (100 - s) / 90),
    "cosine": ({"warmup_steps": 10}, lambda s: s / 10 if s < 10 else _cos((s - 10) / 90)),
    "cosine_with_restarts": ({"warmup_steps": 10, "num_cycles": 3},
                             lambda s: s / 10 if s < 10 else 0.5 * (1 + math.cos(math.pi * ((3 * (s - 10) / 90) % 1)))),
    "polynomial": ({"warmup_steps": 10, "power": 2.0},
                   lambda s: s / 10 if s < 10 else ((LR - 1e-7) * (1 - (s - 10) / 90) ** 2 + 1e-7) / LR),
    "inverse_sqrt": ({"warmup_steps": 10, "timescale": 20},
                     lambda s: s / 10 if s < 10 else 1 / math.sqrt((s + 20 - 10) / 20)),
    "cosine_with_min_lr": ({"warmup_steps": 10, "num_cycles": 1, "min_lr_ratio": 0.1},
                           lambda s: s / 10 if s < 10 else 0.1 + 0.9 * _cos((s - 10) / 90)),
    # warm-up 10, decay 30 → stable 60 (steps 10–69), then a half cosine down to min_lr_ratio
    "warmup_stable_decay": ({"warmup_steps": 10, "decay_steps": 30, "min_lr_ratio": 0.2},
                            lambda s: (0.2 + 0.8 * s / 10 if s < 10 else 1.0 if s < 70
                                       else 0.2 + 0.8 * _cos((s - 70) / 30))),
    "piecewise_constant": ({"scheduler_args": ['step_rules="1:10,0.5:40,0.1"']},
                           lambda s: 1.0 if s < 10 else 0.5 if s < 40 else 0.1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lr_at_chosen_steps(name):
    kwargs, factor = CASES[name]
    got = _lrs(name, STEPS, max_train_steps=100, **kwargs)
    assert got == pytest.approx([LR * factor(s) for s in STEPS], rel=1e-6, abs=1e-12)


def test_total_steps_count_every_process_and_warmup_ratio_or_percent():
    # 50 steps × 2 processes = 100 total; 0.1 and "10%" both mean 10 warm-up steps.
    for warmup in (0.1, "10%", "0.1", 10, "10"):
        got = _lrs("linear", [5, 10, 55], max_train_steps=50, num_processes=2, warmup_steps=warmup)
        assert got == pytest.approx([LR * 0.5, LR, LR * 45 / 90]), warmup
    assert steps_from("25%", 30, "--lr_warmup_steps") == 7  # truncated, as sd-scripts
    assert steps_from(None, 30, "--lr_warmup_steps") == 0
    for bad in (1.5, "1.5", "-3", "150%", "ten"):
        with pytest.raises(LorakitError, match="--lr_warmup_steps"):
            steps_from(bad, 100, "--lr_warmup_steps")


def test_cosine_warmup_with_min_lr_is_wired():
    # transformers' variant warms up to 1 at the last warm-up step and counts decay progress from s − W + 1.
    got = _lrs("cosine_warmup_with_min_lr", [0, 9, 10, 55], max_train_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    expected = [0.1, 1.0, 0.1 + 0.9 * _cos(1 / 90), 0.1 + 0.9 * _cos(46 / 90)]
    assert got == pytest.approx([LR * f for f in expected], rel=1e-6)


def test_custom_scheduler_type_with_args():
    got = _lrs("cosine", [0, 4, 5, 10], max_train_steps=100, scheduler_type="StepLR",
               scheduler_args=["step_size=5", "gamma=0.5"])
    assert got == pytest.approx([LR, LR, LR / 2, LR / 4])
    with pytest.raises(LorakitError, match="--lr_warmup_steps 3: --lr_scheduler_type StepLR has no warm-up"):
        _lrs("cosine", [0], max_train_steps=100, warmup_steps=3, scheduler_type="StepLR",
             scheduler_args=["step_size=5"])


@pytest.mark.parametrize("name", ["constant", "piecewise_constant"])
def test_schedulers_without_warmup_refuse_one(name):
    with pytest.raises(LorakitError, match="has no warm-up"):
        args = ['step_rules="0.5"'] if name == "piecewise_constant" else None
        _lrs(name, [0], max_train_steps=100, warmup_steps=5, scheduler_args=args)


def test_errors_name_the_flag():
    with pytest.raises(LorakitError, match="--lr_scheduler cosinus: expected one of"):
        _lrs("cosinus", [0], max_train_steps=10)
    with pytest.raises(LorakitError, match="needs --lr_scheduler_min_lr_ratio"):
        _lrs("cosine_with_min_lr", [0], max_train_steps=10)
    with pytest.raises(LorakitError, match="reduce_lr_on_plateau is not supported"):
        _lrs("reduce_lr_on_plateau", [0], max_train_steps=10)
    with pytest.raises(LorakitError, match="exceed the 10 training steps"):
        _lrs("warmup_stable_decay", [0], max_train_steps=10, warmup_steps=6, decay_steps=6)
    with pytest.raises(LorakitError, match="needs --lr_scheduler_args step_rules"):
        _lrs("piecewise_constant", [0], max_train_steps=10)


def test_adafactor_scheduler_from_relative_step():
    p = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    built = build_optimizer("Adafactor", [p], 2e-4)
    scheduler = build_scheduler(built.optimizer, built.lr_scheduler, max_train_steps=10)
    assert scheduler.get_last_lr() == [2e-4]  # the initial LR until the first step
    rms = p.detach().pow(2).mean().sqrt().item()
    p.grad = torch.ones_like(p)
    built.optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([1e-2 * rms], rel=1e-5)  # min(1e-2, 1/√step) × RMS(p)
    with pytest.raises(LorakitError, match="adafactor scheduler .*relative_step=False"):
        build_scheduler(built.optimizer, built.lr_scheduler, max_train_steps=10, warmup_steps=2)
    with pytest.raises(LorakitError, match="only for --optimizer_type Adafactor"):
        build_scheduler(_optimizer(), "adafactor", max_train_steps=10)


def test_schedule_free_gets_a_constant_scheduler():
    built = build_optimizer("AdamWScheduleFree", [torch.nn.Parameter(torch.zeros(3))], 1e-3)
    scheduler = build_scheduler(built.optimizer, "cosine", max_train_steps=10, warmup_steps=2,
                                schedule_free=built.schedule_free)
    for _ in range(5):
        scheduler.step()
    assert built.optimizer.param_groups[0]["lr"] == 1e-3
