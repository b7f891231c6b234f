"""The adapter modules: LoRA (`networks/lora.py`'s `LoRAModule`), DoRA, LoHa and LoKr (LyCORIS' kohya-format
modules, `lycoris/modules/locon.py`, `loha.py`, `lokr.py`), each for Linear and Conv2d layers.

The base layer is not replaced: a forward hook adds the module's branch to its output. The base model's
`state_dict()` keeps its own names, its parameters stay frozen, and `torch.compile` and gradient
checkpointing see an ordinary module call. A module holds its base layer outside its own module tree, so the
network's state dict holds exactly the file's tensors:

- LoRA: `lora_down.weight`, `lora_up.weight`, `alpha`; ΔW = multiplier · alpha/rank · up ∘ down
- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): LoRA's tensors and `dora_scale`, a
  learned magnitude m per output channel; the layer's weight becomes m · V / ‖V‖ with V = W + alpha/rank · up ∘ down
  and ‖·‖ the norm of each output channel; the multiplier scales the change: ΔW = multiplier · (m·V/‖V‖ − W)
  (ComfyUI's formula; at multiplier 1 every reader agrees)
- LoHa (Hyeon-Woo et al. 2022, FedPara): `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`;
  ΔW = multiplier · alpha/rank · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)
- LoKr (Yeh et al. 2024, LyCORIS): `lokr_w1`, and `lokr_w2` or its factors `lokr_w2_a`, `lokr_w2_b`; `alpha`;
  ΔW = multiplier · scale · w1 ⊗ w2 (Kronecker), scale = alpha/rank when w2 is factored, else 1 (as ComfyUI
  and AUTOMATIC1111 read the file)

Dropouts (sd-scripts' names): `dropout` drops elements of the rank activations (LoRA, DoRA), `rank_dropout` whole
ranks (LoRA, DoRA) or whole output channels of ΔW (LoHa, LoKr, as LyCORIS does), rescaled by 1/(1 − p) when
`rank_dropout_scale` (sd-scripts' LoRA always is; LyCORIS only when asked), `module_dropout` the whole branch.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from lorakit.errors import LorakitError


class AdapterModule(nn.Module, abc.ABC):
    """What every kind shares: the hook on the base layer, the multiplier, the dropouts, alpha and merging.
    A kind defines `forward(x)` (its branch) and `delta_weight()`."""

    algo = ""  # the kind's name in --network_args algo=
    # Whether ΔW depends on the base weight (DoRA's does): merging then keeps ΔW, for unmerge.
    delta_depends_on_base = False

    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float | None = None, *,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, rank_dropout_scale: bool = True) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: an adapter needs a Linear or Conv2d layer, got {type(base).__name__}")
        self.lora_name = lora_name
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha or rank), device=base.weight.device))
        # A Python float: reading the buffer in forward would sync the GPU and break compiled graphs.
        self.scale = float(alpha or rank) / rank
        # Loading a file's alpha must change the scale too (sd-scripts keeps the scale of the old alpha).
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_scale())
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.module_dropout = module_dropout
        # Not a submodule: keeps the base layer out of this module's state dict, `.to()` and `.parameters()`.
        object.__setattr__(self, "base", base)
        self._handle: RemovableHandle | None = None
        self._merged: tuple | None = None  # set by merge: what unmerge needs

    def _refresh_scale(self) -> None:
        if float(self.alpha) == 0:  # alpha 0 means alpha = rank (no scaling), as in sd-scripts
            self.alpha.fill_(self.rank)
        self.scale = float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    def attach(self) -> None:
        """Start adding the branch to the base layer's output."""
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

    def skipped(self) -> bool:
        """Module dropout: in training, the whole branch is left out with this probability."""
        return self.training and self.module_dropout is not None and bool(torch.rand(1) < self.module_dropout)

    @abc.abstractmethod
    def delta_weight(self) -> Tensor:
        """The branch as a change of the base layer's weight (float32, at the current multiplier)."""

    @torch.no_grad()
    def merge(self) -> None:
        """Add the branch into the base weights and detach (the module no longer adds anything)."""
        if self._merged is not None:
            raise RuntimeError(f"{self.lora_name}: already merged")
        weight = self.base.weight
        delta = self.delta_weight().to(weight.device)
        # What unmerge takes out again: ΔW itself where it depends on the base weight, else how to recompute it.
        self._merged = (delta if self.delta_depends_on_base else self.multiplier, self.attached)
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self.detach()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged branch back out of the base weights (exact in float32 weights) and attach again if it was
        attached before merging."""
        if self._merged is None:
            raise RuntimeError(f"{self.lora_name}: unmerge without merge")
        (kept, was_attached), weight = self._merged, self.base.weight
        if self.delta_depends_on_base:
            delta = kept
        else:
            multiplier, self.multiplier = self.multiplier, kept
            delta = self.delta_weight().to(weight.device)
            self.multiplier = multiplier
        weight.copy_((weight.float() - delta).to(weight.dtype))
        self._merged = None
        if was_attached:
            self.attach()

    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.base.weight.shape)


class LoRAModule(AdapterModule):
    """`y = base(x) + up(down(x)) · multiplier · alpha / rank`."""

    algo = "lora"

    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float | None = None, *,
                 dtype: torch.dtype = torch.float32, **options) -> None:
        """`options`: AdapterModule's (multiplier and dropouts)."""
        super().__init__(lora_name, base, rank, alpha, **options)
        device = base.weight.device
        if isinstance(base, nn.Conv2d):
            # down keeps kernel, stride and padding so the branch has the base conv's output size; up is 1x1.
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device, dtype=dtype)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: Tensor) -> Tensor:
        """The LoRA branch alone: `up(down(x)) · multiplier · scale` with dropouts in training mode."""
        if self.skipped():
            return torch.zeros((), dtype=x.dtype, device=x.device)
        return self.low_rank(x) * self.multiplier

    def low_rank(self, x: Tensor) -> Tensor:
        """`up(down(x)) · scale` with the dropouts, without the multiplier."""
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
            if self.rank_dropout_scale:
                scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        return self.lora_up(h) * scale

    def delta_weight(self) -> Tensor:
        """multiplier · scale · up ∘ down (float32)."""
        return self.multiplier * delta_weight(self.lora_down.weight, self.lora_up.weight, self.scale)


class DoRAModule(LoRAModule):
    """LoRA with a learned magnitude per output channel, `dora_scale`, which starts at the base weight's norms."""

    algo = "dora"
    delta_depends_on_base = True

    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float | None = None, **options) -> None:
        super().__init__(lora_name, base, rank, alpha, **options)
        self.dora_scale = nn.Parameter(channel_norms(base.weight.detach().float()))

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"{self.lora_name}: a DoRA branch needs the base layer's output; it runs as its hook")

    def _add_branch(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """m·V/‖V‖·x − W·x = (m/‖V‖ − 1) · W·x + m/‖V‖ · scale · up(down(x)), W·x being the base output less its
        bias (so the base layer is not run twice)."""
        if self.multiplier == 0 or self.skipped():
            return output
        shape = (1, -1, 1, 1) if self.is_conv else (-1,)
        ratio = (self.dora_scale / channel_norms(self.merged_direction())).view(shape)
        base_output = output if self.base.bias is None else output - self.base.bias.view(shape).to(output.dtype)
        branch = (ratio - 1) * base_output.to(ratio.dtype) + ratio * self.low_rank(args[0]).to(ratio.dtype)
        return output + (branch * self.multiplier).to(output.dtype)

    def merged_direction(self) -> Tensor:
        """V = W + scale · up ∘ down (float32)."""
        return self.base.weight.float() + delta_weight(self.lora_down.weight, self.lora_up.weight, self.scale)

    def delta_weight(self) -> Tensor:
        direction = self.merged_direction()
        decomposed = self.dora_scale.float() * direction / channel_norms(direction)
        return self.multiplier * (decomposed - self.base.weight.float())


class WeightFormModule(AdapterModule):
    """A kind that builds ΔW from its factors (LoHa, LoKr) and applies it with the base layer's operation."""

    @abc.abstractmethod
    def unscaled_delta(self) -> Tensor:
        """ΔW before alpha/rank and the multiplier, shaped like the base weight."""

    def forward(self, x: Tensor) -> Tensor:
        if self.skipped():
            return torch.zeros((), dtype=x.dtype, device=x.device)
        return self.apply_weight(x, self.dropped(self.unscaled_delta()) * (self.scale * self.multiplier))

    def delta_weight(self) -> Tensor:
        return self.unscaled_delta().float() * (self.scale * self.multiplier)

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base layer's operation with another weight and no bias."""
        x = x.to(weight.dtype)
        if self.is_conv:
            base = self.base
            return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, weight)

    def dropped(self, weight: Tensor) -> Tensor:
        """Rank dropout: whole output channels of ΔW (LyCORIS' rule)."""
        if not (self.training and self.rank_dropout):
            return weight
        keep = torch.rand(weight.shape[0], device=weight.device) > self.rank_dropout
        kept = weight * keep.view(-1, *[1] * (weight.dim() - 1)).to(weight.dtype)
        return kept / (1.0 - self.rank_dropout) if self.rank_dropout_scale else kept


class LoHaModule(WeightFormModule):
    """Hadamard product of two low-rank pairs; each w*_b spans the input channels and the kernel, flattened."""

    algo = "loha"

    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float | None = None, *,
                 dtype: torch.dtype = torch.float32, **options) -> None:
        """`options`: AdapterModule's (multiplier and dropouts)."""
        super().__init__(lora_name, base, rank, alpha, **options)
        out_channels, *inputs = base.weight.shape
        options = {"device": base.weight.device, "dtype": dtype}
        self.hada_w1_a = nn.Parameter(torch.empty(out_channels, rank, **options))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, math.prod(inputs), **options))
        self.hada_w2_a = nn.Parameter(torch.empty(out_channels, rank, **options))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, math.prod(inputs), **options))
        # LyCORIS' start: w2_a at 0 makes ΔW 0; the other three are random so that w2_a gets a gradient.
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def unscaled_delta(self) -> Tensor:
        """(w1_a @ w1_b) ⊙ (w2_a @ w2_b), shaped like the base weight."""
        return ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)).view(self.weight_shape())


class LoKrModule(WeightFormModule):
    """Kronecker product w1 ⊗ w2 of the weight's factorisation (out = a·b, in = c·d): w1 is a×c, w2 is
    b×d×kernel, whole or as w2_a @ w2_b (rank r) when r < max(b, d)/2, as LyCORIS decides."""

    algo = "lokr"

    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float | None = None, *, factor: int = -1,
                 w1_shape: tuple[int, int] | None = None, factored_w2: bool | None = None,
                 dtype: torch.dtype = torch.float32, **options) -> None:
        """`factor` splits the weight as LyCORIS does; a file gives `w1_shape` and `factored_w2` instead.
        `options`: AdapterModule's (multiplier and dropouts)."""
        out_channels, in_channels, *kernel = base.weight.shape
        a, c = w1_shape or (factorization(out_channels, factor)[0], factorization(in_channels, factor)[0])
        if out_channels % a or in_channels % c:
            raise LorakitError(f"{lora_name}: a {a}x{c} LoKr w1 does not divide the layer's {out_channels}x"
                               f"{in_channels} weight; is the file for another model?")
        b, d = out_channels // a, in_channels // c
        self.factored_w2 = rank < max(b, d) / 2 if factored_w2 is None else factored_w2
        super().__init__(lora_name, base, rank, alpha, **options)
        self.kernel = tuple(kernel)
        if not self.factored_w2:
            self.scale = 1.0  # a whole w2 has no rank to scale by; readers ignore alpha then
        options = {"device": base.weight.device, "dtype": dtype}
        self.lokr_w1 = nn.Parameter(torch.empty(a, c, **options))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.factored_w2:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank, **options))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * math.prod(kernel), **options))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel, **options))

    def _refresh_scale(self) -> None:
        super()._refresh_scale()
        if not self.factored_w2:
            self.scale = 1.0

    def w2(self) -> Tensor:
        if not self.factored_w2:
            return self.lokr_w2
        return (self.lokr_w2_a @ self.lokr_w2_b).view(self.lokr_w2_a.shape[0], -1, *self.kernel)

    def unscaled_delta(self) -> Tensor:
        """w1 ⊗ w2, shaped like the base weight."""
        return torch.kron(self.lokr_w1.view(*self.lokr_w1.shape, *[1] * len(self.kernel)), self.w2())


ALGOS: dict[str, type[AdapterModule]] = {kind.algo: kind for kind in (LoRAModule, DoRAModule, LoHaModule, LoKrModule)}


@dataclass(frozen=True)
class ModuleSpec:
    """One module as a file describes it (--dim_from_weights, --network_weights' check, base weights)."""

    algo: str
    rank: int
    alpha: float
    w1_shape: tuple[int, int] | None = None  # LoKr: w1's shape, which fixes the factorisation
    factored_w2: bool | None = None  # LoKr: w2 stored as w2_a @ w2_b

    def build(self, lora_name: str, base: nn.Module, **options) -> AdapterModule:
        if self.algo == "lokr":
            options |= {"w1_shape": self.w1_shape, "factored_w2": self.factored_w2}
        return ALGOS[self.algo](lora_name, base, self.rank, self.alpha, **options)


def channel_norms(weight: Tensor) -> Tensor:
    """The norm of each output channel, shaped to broadcast against the weight ([out, 1] or [out, 1, 1, 1])."""
    return weight.flatten(1).norm(dim=1).view(-1, *[1] * (weight.dim() - 1))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of a dimension into m ≤ n with m·n = dimension (`lycoris/functional/general.py`,
    `factorization`): `factor` itself when it divides the dimension, else the most balanced pair whose m is at
    most `factor` (-1: no limit)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def delta_weight(down: Tensor, up: Tensor, scale: float) -> Tensor:
    """`scale · up ∘ down` shaped like the base weight: Linear, 1x1 conv, or k x k conv (down's kernel)."""
    down, up = down.float(), up.float()
    if down.dim() == 2:
        return scale * (up @ down)
    if down.shape[2:] == (1, 1):
        return scale * (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    # up is 1x1: composing it with a k x k down is a 1x1 conv over down's output channels.
    return scale * nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
