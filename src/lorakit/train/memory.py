"""The memory a training step needs, part by part, before any weight is read; and the gradient-checkpointing plan
that keeps it under a budget.

Weights, the network, its gradients and its optimizer state are counted from the meta model's parameters; caches
from the data; activations by running the U-Net with the network on the meta device at the run's largest batch
(`lorakit.train.checkpointing.measure_activations`). The process's own memory (Python, PyTorch, the libraries)
is its resident size when the estimate is made, on the CPU; a GPU's count (`torch.cuda.max_memory_allocated`)
holds tensors only.

On the CPU the resident size also holds what glibc's allocator keeps of freed memory: a forward allocates every
intermediate activation, checkpointed or not, and blocks below glibc's (adaptive) mmap threshold return to its
heap, not to the system. Measured, that reserve is about the activations of an unchecked forward (0.9x to 2x of
them, on the tiny and the full SDXL at 256 to 1024 px), so the CPU estimate counts them once more, whatever the
plan: on a CPU checkpointing saves less than on a GPU. bench/train_step.py prints the estimate beside the measured
peak (bench/README.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from lorakit.config import TrainConfig
from lorakit.data.dataset import Sample
from lorakit.families.base import ModelFamily
from lorakit.models.components import Components
from lorakit.train.checkpointing import (GIB, ActivationProfile, CheckpointPlan, choose_units, measure_activations,
                                         measure_layers)
from lorakit.train.run_setup import compute_dtype, network_dtype

logger = logging.getLogger("lorakit")

GPU_SHARE = 0.9  # of the GPU's free memory a plan fills: the rest absorbs the caching allocator's fragmentation
LATENT_CHANNELS = 4
LATENT_FACTOR = 8  # image side / latent side


@dataclass(frozen=True)
class Workload:
    """What the run's data asks of memory."""

    bucket: tuple[int, int]  # (width, height) of the training batch with the most pixels
    batch_size: int  # ... and its size
    latent_elements: int  # of every latent the memory cache would hold (flipped copies included)
    captions: int  # distinct captions the text cache would hold

    @classmethod
    def of(cls, training: Sequence[Sample], cached: Sequence[Sample]) -> Workload:
        """`training`: the samples that train (validation runs without gradients, saving nothing); `cached`:
        every sample the caches hold, validation included."""
        largest = max(training, key=lambda sample: sample.bucket[0] * sample.bucket[1] * sample.batch_size)
        latents = sum(LATENT_CHANNELS * (s.bucket[0] // LATENT_FACTOR) * (s.bucket[1] // LATENT_FACTOR)
                      * (2 if s.record.subset.flip_aug else 1) for s in cached)
        return cls(largest.bucket, largest.batch_size, latents, len({s.record.caption for s in cached}))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part of the step's peak, and the checkpointing plan the activations assume."""

    parts: tuple[tuple[str, int], ...]  # (what, bytes), activations last
    plan: CheckpointPlan | None  # None without --gradient_checkpointing

    @property
    def total(self) -> int:
        return sum(size for _, size in self.parts)

    def table(self) -> str:
        width = max(len(what) for what, _ in self.parts)
        lines = ["memory estimate of the training step's peak:"]
        lines += [f"  {what:<{width}}  {size_text(size):>10}" for what, size in self.parts]
        lines.append(f"  {'total':<{width}}  {size_text(self.total):>10}")
        if self.plan is not None:
            lines.append(self.plan.describe())
        return "\n".join(lines)


def size_text(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def estimate_memory(config: TrainConfig, family: ModelFamily, model: Components, network: nn.Module | None,
                    workload: Workload, device: torch.device, state_bytes_per_element: float) -> MemoryEstimate:
    """The step's peak on `device`, part by part, from the meta `model` and `network` (None: a plug-in's); with
    --gradient_checkpointing, the plan of units to checkpoint."""
    parts = [("runtime (Python, PyTorch, libraries)", runtime_bytes(device)),
             *model_parts(config, family, model, workload, device),
             *network_parts(config, network, state_bytes_per_element)]
    train_text = trains_text_encoders(config)
    with measuring(config, model, network):
        profile = unet_activations(config, family, model, network, workload)
        text_without, text_held = text_activations(config, model, network, workload) if train_text else (0, 0)
    unchecked = profile.peak(frozenset()) + text_without
    if device.type == "cpu":
        parts.append(("CPU allocator reserve (about the unchecked activations)", unchecked))
    if train_text:
        state = "every layer checkpointed" if config.gradient_checkpointing else "no checkpointing"
        parts.append((f"text encoder activations ({state})", text_held))
    if not config.gradient_checkpointing:
        parts.append(("U-Net activations (no checkpointing)", profile.peak(frozenset())))
        return MemoryEstimate(tuple(parts), None)
    fixed = sum(size for _, size in parts)
    plan = checkpoint_plan(config, profile, fixed, device, peak_without=fixed - text_held + unchecked)
    label = f"U-Net activations ({len(plan.checkpointed)} of {plan.unit_count} units checkpointed)"
    parts.append((label, profile.peak(frozenset(plan.checkpointed))))
    return MemoryEstimate(tuple(parts), plan)


def model_parts(config: TrainConfig, family: ModelFamily, model: Components, workload: Workload,
                device: torch.device) -> list[tuple[str, int]]:
    """The frozen weights the step holds, in the dtypes the run stores them, and on a CPU the caches (a GPU run
    keeps them in the host's memory)."""
    weight_bytes = compute_dtype(config).itemsize
    unet_bytes = 1 if config.fp8_base or config.fp8_base_unet else weight_bytes
    parts = [(f"U-Net weights ({bytes_name(unet_bytes)})", parameter_bytes(model.unet, unet_bytes))]
    if not config.cache_text_encoder_outputs:
        text_bytes = 1 if config.fp8_base else weight_bytes
        parts.append((f"text encoder weights ({bytes_name(text_bytes)})",
                      sum(parameter_bytes(encoder, text_bytes) for encoder in model.text_encoders)))
    vae_bytes = 4 if config.no_half_vae else weight_bytes
    if not config.cache_latents:
        parts.append((f"VAE weights ({bytes_name(vae_bytes)})", parameter_bytes(model.vae, vae_bytes)))
    if device.type != "cpu":
        return parts
    if config.cache_latents and not config.cache_latents_to_disk:
        parts.append(("latent cache", workload.latent_elements * vae_bytes))
    if config.cache_text_encoder_outputs and not config.cache_text_encoder_outputs_to_disk:
        context, *pooled = family.text_stand_in(model.unet, 1, text_tokens(config))
        per_caption = sum(tensor.numel() for tensor in (context, *pooled)) * weight_bytes
        parts.append(("text-encoder output cache", workload.captions * per_caption))
    return parts


def network_parts(config: TrainConfig, network: nn.Module | None, state_bytes_per_element: float,
                  ) -> list[tuple[str, int]]:
    """The trained weights, their gradients (none held with --fused_backward_pass) and the optimizer state."""
    if network is None:
        return [("network: a plug-in's, built at set-up, not counted", 0)]
    trained = sum(p.numel() for p in network.parameters())
    parts = [("network weights", trained * network_dtype(config).itemsize)]
    if not config.fused_backward_pass:
        parts.append(("network gradients", trained * network_dtype(config).itemsize))
    parts.append(("optimizer state", int(trained * state_bytes_per_element)))
    return parts


def checkpoint_plan(config: TrainConfig, profile: ActivationProfile, fixed: int, device: torch.device,
                    peak_without: int) -> CheckpointPlan:
    """--gradient_checkpointing_blocks all: every unit; else the fewest units that fit --memory_budget_gb or the
    GPU's free memory; without either, every unit. `fixed`: every other part of the step's peak."""
    names = profile.unit_names
    if config.gradient_checkpointing_blocks == "all":
        return CheckpointPlan(names, len(names), "as --gradient_checkpointing_blocks all asks", peak_without)
    if config.memory_budget_gb is not None:
        budget, source = int(config.memory_budget_gb * GIB), "--memory_budget_gb"
    elif device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        budget, source = int(GPU_SHARE * free), f"{GPU_SHARE:.0%} of the GPU's free {free / GIB:.1f} GiB"
    else:
        return CheckpointPlan(names, len(names), f"the default on the {device.type.upper()} (--memory_budget_gb "
                              "plans fewer)", peak_without)
    chosen = choose_units(profile, fixed, budget)
    peak = fixed + profile.peak(frozenset(chosen))
    if peak > budget:
        logger.warning("the step's estimated peak, %.2f GiB with every U-Net unit checkpointed, exceeds the budget "
                       "of %.2f GiB (%s)", peak / GIB, budget / GIB, source)
        return CheckpointPlan(chosen, len(names), f"still over the budget of {budget / GIB:.2f} GiB ({source})",
                              peak_without)
    return CheckpointPlan(chosen, len(names), f"the fewest (largest saving first) that fit a budget of "
                          f"{budget / GIB:.2f} GiB ({source})", peak_without)


@contextlib.contextmanager
def measuring(config: TrainConfig, model: Components, network: nn.Module | None) -> Iterator[None]:
    """The meta model and network as the run trains them, restored afterwards: base weights frozen and in the
    compute dtype, the network attached; with mixed precision and a float32 network (no --full_bf16/fp16),
    autocast gives each of its layers a compute-dtype copy of its input, which that layer saves: the meta device
    has no autocast, so the network computes in the compute dtype and each of its layers copies its input. The
    CPU's random state is left as it was (module dropout draws from it)."""
    dtype = compute_dtype(config)
    bases = [module for module in (model.unet, *model.text_encoders) if module is not None]
    before = [(module, next(module.parameters()).dtype, [p.requires_grad for p in module.parameters()])
              for module in bases]
    network_before = next(network.parameters()).dtype if network is not None else None
    hooks = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        for module in bases:
            nn.Module.to(module, dtype)  # not diffusers' `to`, which warns about fp32 modules a stand-in lacks
            module.requires_grad_(False)
        if network is not None:
            network.to(dtype)
            network.attach()  # new_network's network is not attached: detached again below
            if dtype != torch.float32 and network_dtype(config) == torch.float32:
                hooks = [layer.register_forward_pre_hook(lambda _, args: (args[0].clone(), *args[1:]))
                         for layer in network.modules() if isinstance(layer, (nn.Linear, nn.Conv2d))]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            if network is not None:
                network.detach()
                network.to(network_before)
            for module, original, grads in before:
                nn.Module.to(module, original)
                for parameter, grad in zip(module.parameters(), grads):
                    parameter.requires_grad_(grad)


def trains_text_encoders(config: TrainConfig) -> bool:
    """Whether the run trains text encoders (cached text outputs train the U-Net only)."""
    return not config.network_train_unet_only and not config.cache_text_encoder_outputs


def text_activations(config: TrainConfig, model: Components, network: nn.Module | None,
                     workload: Workload) -> tuple[int, int]:
    """Bytes the trained text encoders save for backward at the largest batch (every 75-token chunk is a
    sequence of its own): without checkpointing, and with the run's checkpointing (every layer or none)."""
    chunks = (config.max_token_length or 75) // 75
    without = held = 0
    tokens = torch.zeros(workload.batch_size * chunks, 77, dtype=torch.long, device="meta")
    for encoder in model.text_encoders:
        layers = [(name, module) for name, module in encoder.named_modules()
                  if isinstance(module, GradientCheckpointingLayer)]
        profile = measure_layers(encoder, layers, lambda: encoder(tokens, output_hidden_states=True),
                                 (network,) if network is not None else ())
        without += profile.peak(frozenset())
        held += profile.peak({name for name, _ in layers} if config.gradient_checkpointing else set())
    return without, held


def unet_activations(config: TrainConfig, family: ModelFamily, model: Components, network: nn.Module | None,
                     workload: Workload) -> ActivationProfile:
    """One training forward of the meta U-Net (under `measuring`) at the largest batch; the text conditioning
    takes gradients when text encoders train."""
    unet, dtype = model.unet, compute_dtype(config)
    width, height = workload.bucket
    batch = workload.batch_size

    def forward() -> torch.Tensor:
        with torch.device("meta"):
            # without the plug-in's network, gradients through every layer stand in for its own
            noisy = torch.empty(batch, LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR,
                                dtype=dtype, requires_grad=network is None)
            timesteps = torch.zeros(batch, dtype=torch.long)
            sizes = torch.empty(batch, 6, dtype=dtype)
        text = tuple(t.requires_grad_(trains_text_encoders(config))
                     for t in family.text_stand_in(unet, batch, text_tokens(config)))
        return family.predict(unet, noisy, timesteps, text, sizes)

    return measure_activations(unet, forward, (network,) if network is not None else ())


def text_tokens(config: TrainConfig) -> int:
    """Tokens of a caption's text conditioning: 75, 150 or 225 plus the start and end tokens."""
    return (config.max_token_length or 75) + 2


def parameter_bytes(module: nn.Module | None, bytes_each: int) -> int:
    return sum(p.numel() for p in module.parameters()) * bytes_each if module is not None else 0


def bytes_name(size: int) -> str:
    return {1: "float8", 2: "16-bit", 4: "fp32"}[size]


def runtime_bytes(device: torch.device) -> int:
    if device.type != "cpu":
        return 0
    import psutil

    return psutil.Process().memory_info().rss
