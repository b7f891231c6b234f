"""Gradient checkpointing to a memory budget: checkpoint only the U-Net units the step's memory needs.

A *unit* is a module of diffusers' U-Net with a `gradient_checkpointing` flag: a down/mid/up block (it recomputes
its resnets) or a Transformer2DModel (its transformer blocks); SDXL's U-Net has 18. What a unit recomputes is
exactly what it passes to its `_gradient_checkpointing_func`, so `measure_activations` hands every unit a function
of its own that runs the module plainly and counts the activations its operations save for backward: the
measurement follows the installed diffusers, on the meta device (no memory, no arithmetic) at the run's largest
bucket and batch size.

`choose_units` then checkpoints the fewest units, largest saving first, that bring the step's estimated peak
under the budget; `apply_plan` sets the flags. Checkpointing recomputes the same operations on the same inputs, so
no plan changes the result (tests/test_checkpointing.py compares trained weights bit for bit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

GIB = 2**30
ABSENT = object()


@dataclass(frozen=True)
class Segment:
    """One checkpointed call of a unit (a block calls it once per resnet) and what it holds for backward."""

    unit: str  # the unit's module path in the U-Net ("down_blocks.2", "up_blocks.0.attentions.1")
    saved: int  # bytes of activations its operations save for backward when it is not checkpointed
    kept: int  # bytes of its inputs, which checkpointing keeps instead
    outside_before: int  # bytes saved outside every unit before it ran (conv_in, projections, samplers, ...)


@dataclass(frozen=True)
class ActivationProfile:
    """The activations one training step of the U-Net saves for backward, by segment in forward order."""

    segments: tuple[Segment, ...]
    outside: int  # bytes saved outside every unit in the whole forward
    unit_names: tuple[str, ...]  # every unit, in module order

    def saving(self, unit: str) -> int:
        return sum(s.saved - s.kept for s in self.segments if s.unit == unit)

    def peak(self, checkpointed: frozenset[str] | set[str]) -> int:
        """Activation bytes at the step's high point with these units checkpointed: everything held when backward
        starts, or a checkpointed segment rebuilt in backward on top of what the segments before it hold (those
        after it are freed by then)."""
        held = peak = 0
        for segment in self.segments:
            if segment.unit in checkpointed:
                peak = max(peak, segment.outside_before + held + segment.saved)
                held += segment.kept
            else:
                held += segment.saved
        return max(peak, self.outside + held)


@dataclass(frozen=True)
class CheckpointPlan:
    """The units a run checkpoints and why."""

    checkpointed: tuple[str, ...]  # in module order
    unit_count: int
    reason: str  # "as --gradient_checkpointing_blocks all asks", "the fewest ... that fit a budget of 12.00 GiB", ...
    peak_without: int  # the step's estimated peak (bytes) with no unit checkpointed

    def describe(self) -> str:
        count = len(self.checkpointed)
        if count == self.unit_count:
            which = f"all {count} U-Net units"
        elif count == 0:
            which = f"none of the {self.unit_count} U-Net units"
        else:
            which = f"{count} of {self.unit_count} U-Net units ({', '.join(self.checkpointed)})"
        return (f"gradient checkpointing: {which}, {self.reason}; the estimate without checkpointing: "
                f"{self.peak_without / GIB:.2f} GiB")


def checkpoint_units(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The U-Net's modules with a gradient-checkpointing flag, in module order."""
    return [(name, module) for name, module in unet.named_modules()
            if name and isinstance(getattr(module, "gradient_checkpointing", None), bool)]


def choose_units(profile: ActivationProfile, fixed: int, budget: int) -> tuple[str, ...]:
    """The fewest units to checkpoint, largest saving first, so that `fixed` (weights, optimizer state, caches)
    plus the activations' peak fits `budget`; every unit when nothing fits. In module order."""
    order = sorted(profile.unit_names, key=profile.saving, reverse=True)
    chosen: set[str] = set()
    for unit in order:
        if fixed + profile.peak(chosen) <= budget:
            break
        chosen.add(unit)
    return tuple(name for name in profile.unit_names if name in chosen)


def apply_plan(unet: nn.Module, checkpointed: tuple[str, ...]) -> None:
    """Turn on gradient checkpointing (diffusers' non-reentrant function) for these units only."""
    unet.enable_gradient_checkpointing()
    for name, module in checkpoint_units(unet):
        module.gradient_checkpointing = name in checkpointed


class _SavedTensors:
    """Counts the distinct non-parameter tensors autograd saves, by segment: a segment opens with `enter`, closes
    with `leave`, and what is saved between counts for it (nested segments count for the outermost)."""

    def __init__(self, parameters: set[int]):
        self.parameters = parameters
        self.seen: dict[int, torch.Tensor] = {}  # held, so that ids are not reused (meta tensors cost nothing)
        self.inputs: dict[int, torch.Tensor] = {}  # each input once: the text context goes to every attention unit
        self.outside = 0
        self.inside = 0
        self.segments: list[Segment] = []
        self.open: list[tuple[str, int, int, int]] = []  # (unit, kept, outside before, inside before)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in self.parameters and id(base) not in self.seen:
            self.seen[id(base)] = base
            size = base.numel() * base.element_size()
            if self.open:
                self.inside += size
            else:
                self.outside += size
        return tensor

    def enter(self, unit: str, args: tuple) -> None:
        kept = 0
        for tensor in args:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self.inputs:
                self.inputs[id(tensor)] = tensor
                kept += tensor.numel() * tensor.element_size()
        self.open.append((unit, kept, self.outside, self.inside))

    def leave(self) -> None:
        unit, kept, outside_before, inside_before = self.open.pop()
        if not self.open:
            self.segments.append(Segment(unit, self.inside - inside_before, kept, outside_before))

    def profile(self, unit_names: tuple[str, ...]) -> ActivationProfile:
        return ActivationProfile(tuple(self.segments), self.outside, unit_names)


@contextlib.contextmanager
def memory_efficient_attention() -> Iterator[None]:
    """Attention on the meta device as the training devices run it: the meta device takes SDPA's math path,
    which saves the whole attention matrix for backward; the CPU's flash kernel, like CUDA's flash and
    memory-efficient ones (and xformers), saves only the inputs, the output and one log-sum-exp per query."""
    plain = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def measure_activations(unet: nn.Module, forward: Callable[[], torch.Tensor],
                        extra_parameters: tuple[nn.Module, ...] = ()) -> ActivationProfile:
    """What one forward of `forward()` (the U-Net's training call on the meta device) saves for backward, by
    checkpointed segment. `extra_parameters`: modules whose parameters are weights, not activations (the
    network)."""
    counter = _SavedTensors({id(p) for module in (unet, *extra_parameters) for p in module.parameters()})
    units = checkpoint_units(unet)
    previous = [(module.gradient_checkpointing, module.__dict__.get("_gradient_checkpointing_func", ABSENT))
                for _, module in units]

    def counted(name: str) -> Callable:
        def run(module: nn.Module, *args):
            counter.enter(name, args)
            try:
                return module(*args)
            finally:
                counter.leave()
        return run

    try:
        for name, module in units:
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = counted(name)
        with memory_efficient_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            forward()
    finally:
        for (_, module), (flag, function) in zip(units, previous):
            module.gradient_checkpointing = flag
            if function is ABSENT:
                del module._gradient_checkpointing_func
            else:
                module._gradient_checkpointing_func = function
    return counter.profile(tuple(name for name, _ in units))


def measure_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], forward: Callable[[], object],
                   extra_parameters: tuple[nn.Module, ...] = ()) -> ActivationProfile:
    """The same for a model whose checkpointed units are whole layers (a text encoder's transformer layers under
    transformers' gradient checkpointing), counted through forward hooks."""
    counter = _SavedTensors({id(p) for module in (model, *extra_parameters) for p in module.parameters()})
    handles = []
    for name, layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda _, args, name=name: counter.enter(name, args)))
        handles.append(layer.register_forward_hook(lambda *_: counter.leave()))
    try:
        with memory_efficient_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return counter.profile(tuple(name for name, _ in layers))
