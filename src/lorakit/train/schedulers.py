"""`--lr_scheduler` and its flags → a torch LR scheduler, as sd-scripts' `library/train_util.py`
`get_scheduler_fix`.

The schedules are transformers' (and diffusers' `piecewise_constant`). Steps count optimizer steps over all
processes: total = max_train_steps × num_processes, because accelerate steps the scheduler once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.optimization import get_piecewise_constant_schedule
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from transformers import optimization as hf

from lorakit.errors import LorakitError
from lorakit.train.optimizers import import_attribute, parse_kwargs

log = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
              "piecewise_constant", "adafactor")
StepsValue = int | float | str | None


def steps_from(value: StepsValue, total: int, flag: str) -> int:
    """A step count given as an integer, a fraction < 1 of `total`, or "N%" of `total` (truncated, as sd-scripts)."""
    if value is None:
        return 0
    text = str(value).strip()
    try:
        if text.endswith("%"):
            number = float(text[:-1]) / 100.0
            if not 0.0 <= number <= 1.0:
                raise ValueError
            return int(number * total)
        number = float(text)
    except ValueError:
        raise LorakitError(f"{flag} {value!r}: expected a step count, a ratio below 1 or a percentage "
                           "such as 10%") from None
    if isinstance(value, bool) or number < 0 or (number >= 1 and not number.is_integer()):
        raise LorakitError(f"{flag} {value!r}: expected a whole number of steps, a ratio below 1 or N%")
    return int(number * total) if number < 1 else int(number)


def _no_warmup(scheduler: LRScheduler, warmup_steps: int, what: str) -> LRScheduler:
    if warmup_steps:
        raise LorakitError(f"--lr_warmup_steps {warmup_steps}: {what} has no warm-up; set it to 0 "
                           "(or use --lr_scheduler constant_with_warmup)")
    return scheduler


def _custom_scheduler(optimizer: torch.optim.Optimizer, scheduler_type: str, kwargs: dict[str, Any]) -> LRScheduler:
    module_name, dot, class_name = scheduler_type.rpartition(".")
    scheduler_class = import_attribute(module_name if dot else "torch.optim.lr_scheduler", class_name,
                                       "--lr_scheduler_type", scheduler_type)
    try:
        return scheduler_class(optimizer, **kwargs)
    except TypeError as error:
        raise LorakitError(f"--lr_scheduler_args for {scheduler_type}: {error}") from None


def _adafactor_scheduler(optimizer: torch.optim.Optimizer, name: str) -> LRScheduler:
    optimizer = getattr(optimizer, "optimizer", optimizer)  # AdafactorSchedule reads Adafactor's own _get_lr
    if type(optimizer).__name__ != "Adafactor":
        raise LorakitError(f"--lr_scheduler {name}: only for --optimizer_type Adafactor, "
                           f"not {type(optimizer).__name__}")
    _, _, suffix = name.partition(":")
    initial_lr = float(suffix) if suffix else optimizer.param_groups[0].get("lr") or 0.0
    return hf.AdafactorSchedule(optimizer, initial_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str = "constant", *, max_train_steps: int,
                    num_processes: int = 1, warmup_steps: StepsValue = 0, decay_steps: StepsValue = 0,
                    num_cycles: int = 1, power: float = 1.0, timescale: int | None = None,
                    min_lr_ratio: float | None = None, scheduler_type: str = "",
                    scheduler_args: Sequence[str] | None = None, schedule_free: bool = False) -> LRScheduler:
    """The LR scheduler of a run; `name` may be "adafactor:<lr>" as forced by Adafactor's relative step."""
    total = max_train_steps * num_processes
    warmup = steps_from(warmup_steps, total, "--lr_warmup_steps")
    decay = steps_from(decay_steps, total, "--lr_decay_steps")
    kwargs = parse_kwargs(scheduler_args, "--lr_scheduler_args")

    if schedule_free:
        if name != "constant" or warmup or scheduler_type:
            log.warning("schedule-free optimizer: --lr_scheduler/--lr_warmup_steps are not used (give warmup_steps "
                        "in --optimizer_args instead)")
        return LambdaLR(optimizer, lambda _: 1.0)
    if scheduler_type:
        return _no_warmup(_custom_scheduler(optimizer, scheduler_type, kwargs), warmup,
                          f"--lr_scheduler_type {scheduler_type}")
    if name == "adafactor" or name.startswith("adafactor:"):
        return _no_warmup(_adafactor_scheduler(optimizer, name), warmup,
                          "the adafactor scheduler (forced by Adafactor's relative_step; give relative_step=False "
                          "in --optimizer_args to choose another)")
    try:
        return _schedule(optimizer, name, total, warmup, decay, num_cycles, power, timescale, min_lr_ratio, kwargs)
    except TypeError as error:
        raise LorakitError(f"--lr_scheduler_args for --lr_scheduler {name}: {error}") from None


def _schedule(optimizer: torch.optim.Optimizer, name: str, total: int, warmup: int, decay: int, num_cycles: int,
              power: float, timescale: int | None, min_lr_ratio: float | None,
              kwargs: dict[str, Any]) -> LRScheduler:
    with_total = {"num_warmup_steps": warmup, "num_training_steps": total, **kwargs}
    if name == "constant":
        return _no_warmup(hf.get_constant_schedule(optimizer, **kwargs), warmup, "--lr_scheduler constant")
    if name == "constant_with_warmup":
        return hf.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup, **kwargs)
    if name == "linear":
        return hf.get_linear_schedule_with_warmup(optimizer, **with_total)
    if name == "cosine":
        return hf.get_cosine_schedule_with_warmup(optimizer, **with_total)
    if name == "cosine_with_restarts":
        return hf.get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, num_cycles=num_cycles, **with_total)
    if name == "polynomial":
        return hf.get_polynomial_decay_schedule_with_warmup(optimizer, power=power, **with_total)
    if name == "inverse_sqrt":
        return hf.get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup, timescale=timescale, **kwargs)
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        if min_lr_ratio is not None:
            with_total = {"min_lr_rate": min_lr_ratio, **with_total}
        elif "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            raise LorakitError(f"--lr_scheduler {name} needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        function = (hf.get_cosine_with_min_lr_schedule_with_warmup if name == "cosine_with_min_lr"
                    else hf.get_cosine_with_min_lr_schedule_with_warmup_lr_rate)
        return function(optimizer, num_cycles=num_cycles / 2, **with_total)
    if name == "warmup_stable_decay":
        stable = total - warmup - decay
        if stable < 0:
            raise LorakitError(f"--lr_warmup_steps {warmup} + --lr_decay_steps {decay} exceed the {total} "
                               "training steps")
        return hf.get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_stable_steps=stable,
                                   num_decay_steps=decay, num_cycles=num_cycles / 2,
                                   min_lr_ratio=0.0 if min_lr_ratio is None else min_lr_ratio, **kwargs)
    if name == "piecewise_constant":
        if "step_rules" not in kwargs:
            raise LorakitError("--lr_scheduler piecewise_constant needs --lr_scheduler_args "
                               "step_rules=\"1:100,0.1\" (multiplier:until-step pairs, then the final multiplier)")
        return _no_warmup(get_piecewise_constant_schedule(optimizer, **kwargs), warmup,
                          "--lr_scheduler piecewise_constant")
    if name == "reduce_lr_on_plateau":
        raise LorakitError("--lr_scheduler reduce_lr_on_plateau is not supported: it needs a metric every step "
                           f"and sd-scripts never passes one; choose one of {', '.join(SCHEDULERS)}")
    raise LorakitError(f"--lr_scheduler {name}: expected one of {', '.join(SCHEDULERS)}")
