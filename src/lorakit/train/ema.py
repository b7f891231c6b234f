"""`--ema_decay`: an exponential moving average (EMA) of the trained weights, saved beside each LoRA file.

After optimizer step s (counted from 1 over the whole run): while s ≤ `--ema_update_after_step` the average is
the weights themselves (the warm-up); after it, every `--ema_update_every` steps,
average ← decay · average + (1 − decay) · weights. The average is kept in float32, on the training device or on
the CPU (`--ema_on_cpu`), written as `{name}-ema.safetensors` (the network's keys and metadata, its trained tensors
replaced by their average) beside every LoRA file, and into states, so a resumed run goes on with it bit for bit.
`--sample_with_ema` makes samples with the average in place of the weights.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from lorakit.config import TrainConfig
from lorakit.errors import LorakitError
from lorakit.network.io import save_lora
from lorakit.train.state import TrainState

logger = logging.getLogger(__name__)


class WeightAverage:
    """The EMA of a network's trained parameters (those with requires_grad when it is made)."""

    def __init__(self, network: nn.Module, decay: float, *, update_after_step: int = 0, update_every: int = 1,
                 device: torch.device | str | None = None) -> None:
        self.network, self.decay = network, decay
        self.update_after_step, self.update_every = update_after_step, update_every
        trained = [(name, parameter) for name, parameter in network.named_parameters() if parameter.requires_grad]
        self.names = [name for name, _ in trained]
        self.parameters = [parameter for _, parameter in trained]
        self.average = [parameter.detach().to(device or parameter.device, torch.float32, copy=True)
                        for parameter in self.parameters]

    @classmethod
    def of(cls, config: TrainConfig, network: nn.Module) -> WeightAverage | None:
        if config.ema_decay is None:
            return None
        return cls(network, config.ema_decay, update_after_step=config.ema_update_after_step,
                   update_every=config.ema_update_every, device="cpu" if config.ema_on_cpu else None)

    def summary(self) -> str:
        device = self.average[0].device if self.average else "cpu"
        return (f"EMA of {len(self.names)} trained tensors: decay {self.decay:g}, the weights themselves until step "
                f"{self.update_after_step}, then every {self.update_every} step(s); float32 on {device}")

    @torch.no_grad()
    def restart(self) -> None:
        """The average is the weights as they are now."""
        for average, parameter in zip(self.average, self.parameters):
            average.copy_(parameter.detach())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based, the run's global step)."""
        if step <= self.update_after_step:
            for average, parameter in zip(self.average, self.parameters):
                average.copy_(parameter.detach())
        elif (step - self.update_after_step) % self.update_every == 0:
            for average, parameter in zip(self.average, self.parameters):
                average.mul_(self.decay).add_(parameter.detach().to(average.device, torch.float32),
                                              alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The averages by parameter name (CPU tensors), for states."""
        return {name: average.detach().cpu() for name, average in zip(self.names, self.average)}

    def load_state_dict(self, state: Mapping[str, Tensor], source: str) -> None:
        """Averages from a state; the names must be the network's trained parameters."""
        if set(state) != set(self.names):
            missing = sorted(set(self.names) - set(state)) or sorted(set(state) - set(self.names))
            raise LorakitError(f"--resume {source}: its EMA weights do not fit this network (first differing "
                               f"tensor {missing[0]!r}); resume with the network it was saved with")
        for name, average in zip(self.names, self.average):
            if state[name].shape != average.shape:
                raise LorakitError(f"--resume {source}: EMA tensor {name} has shape {tuple(state[name].shape)}, the "
                                   f"network's is {tuple(average.shape)}")
            average.copy_(state[name])

    def network_state(self, dtype: torch.dtype | None) -> dict[str, Tensor]:
        """The network's state dict with its trained tensors replaced by their averages (CPU, in `dtype` when
        given, else each parameter's own dtype)."""
        averages = dict(zip(self.names, self.average))
        state = {}
        for key, value in self.network.state_dict().items():
            tensor = averages.get(key, value)
            state[key] = tensor.detach().to("cpu", dtype=dtype or value.dtype).contiguous()
        return state

    def save(self, path: Path, dtype: torch.dtype | None, metadata: Mapping[str, str]) -> None:
        metadata = {**metadata, "lorakit_ema": json.dumps({"decay": self.decay,
                                                            "update_after_step": self.update_after_step,
                                                            "update_every": self.update_every})}
        save_lora(self.network_state(dtype), path, metadata)
        logger.info("saved %s", path)

    @contextmanager
    def in_place(self) -> Iterator[None]:
        """The averages in the network's parameters for the duration (samples with --sample_with_ema)."""
        with torch.no_grad():
            kept = [parameter.detach().clone() for parameter in self.parameters]
            for parameter, average in zip(self.parameters, self.average):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, original in zip(self.parameters, kept):
                    parameter.copy_(original)


def start_average(average: WeightAverage | None, resumed: TrainState | None, source: str | None) -> None:
    """The average a run starts with, once the network holds its starting weights: a resumed state's, else those
    weights (after --network_weights, or a state saved without EMA)."""
    if average is None:
        if resumed is not None and resumed.ema is not None:
            logger.warning("--resume %s: the state's EMA weights are not used (no --ema_decay)", source)
    elif resumed is not None and resumed.ema is not None:
        average.load_state_dict(resumed.ema, str(source))
    else:
        if resumed is not None:
            logger.warning("--resume %s: the state holds no EMA weights (its run had no --ema_decay); the average "
                           "starts from the resumed weights", source)
        average.restart()
