"""`--fused_backward_pass`: each parameter steps the moment its gradient is complete, and the gradient is freed.

A `register_post_accumulate_grad_hook` on every trained parameter steps a one-parameter optimizer of the same
class and settings (its group's hyper-parameters copied), then sets the gradient to None, so the gradients of the
whole network never exist at once. The per-parameter optimizers share the main optimizer's `state`, so the main
optimizer's `state_dict()` / `load_state_dict()` save and resume them, and they read their learning rate from the
main optimizer's group at every step, so the LR scheduler keeps stepping the main optimizer once per step.

The loop in fused mode: `backward()` only — no `optimizer.step()`, no `zero_grad()` — then `lr_scheduler.step()`.
No fp16 GradScaler: gradients are used before anything could unscale them (bf16 and fp32 are fine).
`max_grad_norm` clips each parameter's gradient by its own norm (as sd-scripts' sdxl_train.py fused path), since a
global norm needs every gradient at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lorakit.errors import LorakitError

# Optimizers whose step couples parameters (a global step-size estimate, or train/eval weight swaps per optimizer).
_NOT_PER_PARAMETER = {"prodigyopt": "its step size D is estimated from all parameters together",
                      "dadaptation": "its step size D is estimated from all parameters together",
                      "schedulefree": "its train/eval weight swap belongs to one optimizer"}


def check_fused_backward(optimizer_class: type, gradient_accumulation_steps: int, num_processes: int = 1) -> None:
    """Refuse what a per-parameter step cannot do, with the reason."""
    if gradient_accumulation_steps > 1:
        raise LorakitError(f"--fused_backward_pass with --gradient_accumulation_steps {gradient_accumulation_steps}: "
                           "each parameter steps as soon as its gradient exists, so there is nothing to accumulate "
                           "into; use --gradient_accumulation_steps 1")
    if num_processes > 1:
        raise LorakitError(f"--fused_backward_pass with {num_processes} processes: parameters would step before "
                           "their gradients are averaged across processes; train on one process")
    package = optimizer_class.__module__.split(".")[0]
    if package in _NOT_PER_PARAMETER:
        raise LorakitError(f"--fused_backward_pass with {optimizer_class.__name__}: it cannot step one parameter "
                           f"at a time ({_NOT_PER_PARAMETER[package]}); use Adafactor, AdamW, Lion or SGD")


class FusedBackward:
    """The installed hooks; `remove()` takes them off again (the main optimizer then works as usual)."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
                 max_grad_norm: float = 0.0) -> None:
        self.optimizer = optimizer
        self._inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        self.max_grad_norm = max_grad_norm
        self._handles = []
        for index, group in enumerate(optimizer.param_groups):
            settings = {key: value for key, value in group.items() if key != "params"}
            for param in group["params"]:
                single = make_optimizer([{**settings, "params": [param]}])
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(param, single, index)))

    def _hook(self, param: torch.Tensor, single: torch.optim.Optimizer,
              group_index: int) -> Callable[[torch.Tensor], None]:
        def step(_: torch.Tensor) -> None:
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
            # Looked up at every step: the main optimizer's load_state_dict replaces its state and group dicts.
            single.state = self._inner.state
            single.param_groups[0]["lr"] = self._inner.param_groups[group_index]["lr"]
            single.step()
            param.grad = None
            self._inner._opt_called = True  # what torch's step wrapper records; keeps LR schedulers from warning

        return step

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def fuse_backward(optimizer: torch.optim.Optimizer,
                  make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer], *,
                  gradient_accumulation_steps: int = 1, max_grad_norm: float = 0.0,
                  num_processes: int = 1) -> FusedBackward:
    """Install the per-parameter steps on `optimizer`'s parameters. `make_optimizer` builds the same optimizer
    over other parameter groups (`BuiltOptimizer.make`)."""
    check_fused_backward(type(getattr(optimizer, "optimizer", optimizer)), gradient_accumulation_steps, num_processes)
    return FusedBackward(optimizer, make_optimizer, max_grad_norm)
