"""Loss scaling for `--mixed_precision fp16`: fp16 gradients of small losses underflow to zero, so the loss is
multiplied by a large factor before backward and the gradients divided by it before clipping and the optimizer
step; a step whose gradients overflowed is skipped and the factor lowered (torch's `GradScaler`, which
accelerate uses for sd-scripts). Under bf16 or fp32 the scaler is disabled and passes everything through."""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError


class Fp16GradScaler(torch.amp.GradScaler):
    """`--full_fp16`: the LoRA weights, and so their gradients, are fp16, which torch's scaler refuses to unscale;
    sd-scripts patches accelerate's scaler the same way."""

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def gradient_scaler(mixed_precision: str, *, full_fp16: bool, fused_backward_pass: bool,
                    device_type: str) -> torch.amp.GradScaler:
    """The run's scaler: enabled for fp16 mixed precision only."""
    if mixed_precision != "fp16":
        return torch.amp.GradScaler(device_type, enabled=False)
    if fused_backward_pass:
        raise LorakitError("--fused_backward_pass with --mixed_precision fp16: each parameter steps inside "
                           "backward, before a loss scaler can check the gradients for overflow; use "
                           "--mixed_precision bf16, or drop --fused_backward_pass")
    return (Fp16GradScaler if full_fp16 else torch.amp.GradScaler)(device_type)
