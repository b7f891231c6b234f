"""One LoRA module (`networks/lora.py`'s `LoRAModule`): `y = base(x) + up(down(x)) · multiplier · alpha / rank`.

The base layer is not replaced: a forward hook adds the LoRA branch to its output. The base model's
`state_dict()` keeps its own names, its parameters stay frozen, and `torch.compile` and gradient
checkpointing see an ordinary module call. The LoRA module holds the base layer outside its own module
tree, so the network's state dict holds exactly `<name>.lora_down.weight`, `<name>.lora_up.weight`,
`<name>.alpha`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class LoRAModule(nn.Module):
    def __init__(
        self,
        lora_name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.rank = rank
        device = base.weight.device
        if isinstance(base, nn.Conv2d):
            # down keeps kernel, stride and padding so the branch has the base conv's output size; up is 1x1.
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device, dtype=dtype)
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        else:
            raise TypeError(f"{lora_name}: LoRA needs a Linear or Conv2d layer, got {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha or rank), device=device))
        # A Python float: reading the buffer in forward would sync the GPU and break compiled graphs.
        self.scale = float(alpha or rank) / rank
        # Loading a file's alpha must change the scale too (sd-scripts keeps the scale of the old alpha).
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_scale())
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # Not a submodule: keeps the base layer out of this module's state dict, `.to()` and `.parameters()`.
        object.__setattr__(self, "base", base)
        self._handle: RemovableHandle | None = None

    def _refresh_scale(self) -> None:
        if float(self.alpha) == 0:  # alpha 0 means alpha = rank (no scaling), as in sd-scripts
            self.alpha.fill_(self.rank)
        self.scale = float(self.alpha) / self.rank

    def attach(self) -> None:
        """Start adding the LoRA branch to the base layer's output."""
        if self._handle is None:
            self._handle = self.base.register_forward_hook(self._add_branch)

    def detach(self) -> None:
        """Stop adding the branch; the base layer is back to its own output."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _add_branch(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if self.multiplier == 0:
            return output
        return output + self(args[0]).to(output.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """The LoRA branch alone: `up(down(x)) · multiplier · scale` with dropouts in training mode."""
        if self.training and self.module_dropout is not None and torch.rand(1) < self.module_dropout:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.training and self.dropout is not None:
            h = nn.functional.dropout(h, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout is not None:
            mask = torch.rand((h.shape[0], self.rank), device=h.device) > self.rank_dropout
            if h.dim() == 3:  # [B, tokens, rank]
                mask = mask.unsqueeze(1)
            elif h.dim() == 4:  # [B, rank, H, W]
                mask = mask[:, :, None, None]
            h = h * mask
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        return self.lora_up(h) * (self.multiplier * scale)

    def delta_weight(self) -> Tensor:
        """The branch as a weight update of the base layer: multiplier · scale · up ∘ down (float32)."""
        return self.multiplier * delta_weight(self.lora_down.weight, self.lora_up.weight, self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the branch into the base weights and detach (the module no longer adds anything)."""
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype))
        self.detach()


def delta_weight(down: Tensor, up: Tensor, scale: float) -> Tensor:
    """`scale · up ∘ down` shaped like the base weight: Linear, 1x1 conv, or k x k conv (down's kernel)."""
    down, up = down.float(), up.float()
    if down.dim() == 2:
        return scale * (up @ down)
    if down.shape[2:] == (1, 1):
        return scale * (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    # up is 1x1: composing it with a k x k down is a 1x1 conv over down's output channels.
    return scale * nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
