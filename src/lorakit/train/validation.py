"""Validation loss (sd-scripts' `train_network.py`, its validation block): every held-out batch at fixed
timesteps, with its own seeded generator, the network in eval mode, no gradients, and every global RNG state put
back afterwards — so validating never changes what training draws, and the same weights always give the same
validation loss."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from lorakit.train.state import preserved_rng
from lorakit.train.step import StepOptions

LINSPACE_POINTS = 6  # linspace(min_t, max_t, 6) without its ends: 4 timesteps (200, 400, 600, 800 by default)


def validation_timesteps(min_timestep: int, max_timestep: int) -> list[int]:
    points = torch.linspace(min_timestep, max_timestep, LINSPACE_POINTS)[1:-1]
    return [int(t) for t in points.round().tolist()]


def fixed_timestep_options(options: StepOptions, timestep: int) -> StepOptions:
    """Step options that draw exactly `timestep` for every sample (min == max timestep)."""
    noise = dataclasses.replace(options.noise, min_timestep=timestep, max_timestep=timestep)
    return dataclasses.replace(options, noise=noise)


def should_validate(when: str, *, global_step: int, epoch: int, every_n_steps: int | None,
                    every_n_epochs: int | None) -> bool:
    """`when` is "step" (after an optimizer step) or "epoch" (after an epoch); epoch-level validation runs every
    epoch unless --validate_every_n_epochs says otherwise."""
    if when == "step":
        return bool(every_n_steps) and global_step % every_n_steps == 0
    return epoch % (every_n_epochs or 1) == 0


@torch.no_grad()
def validation_loss(batches: Iterable, loss_of: Callable[[object, StepOptions, torch.Generator], torch.Tensor],
                    options: StepOptions, timesteps: Sequence[int], seed: int, network: torch.nn.Module,
                    max_batches: int | None = None) -> tuple[float, int]:
    """(sum of losses, count) over the batches (at most `max_batches`) × `timesteps`. `loss_of(batch, options,
    generator)` is the training step's loss. Global RNG states and the network's train/eval mode are restored."""
    generator = torch.Generator("cpu").manual_seed(seed)
    total, count = 0.0, 0
    was_training = network.training
    with preserved_rng():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        network.eval()
        try:
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                for timestep in timesteps:
                    total += float(loss_of(batch, fixed_timestep_options(options, timestep), generator))
                    count += 1
        finally:
            network.train(was_training)
    return total, count
