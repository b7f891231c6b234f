"""Where a run starts and where it is: a resumed state's exact position or `--initial_step/--initial_epoch`,
and the loop's progress that the next state carries on (`lorakit.train.state` writes and reads the folders)."""

from __future__ import annotations

import copy
import logging
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lorakit.config import TrainConfig
from lorakit.errors import LorakitError, one_line
from lorakit.train.logs import MovingAverage
from lorakit.train.state import TrainState, preserved_rng, read_state, set_rng_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartPosition:
    global_step: int  # optimizer steps already done (absolute)
    epoch: int  # 1-based epoch the loop starts in
    batches_done: int  # batches of that epoch already consumed (per process)


def _is_int(value: Any, low: int, high: int = 2**63 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What the run reads from a state's progress.json, and what each value must be.
PROGRESS_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "global_step": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "epoch": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "batches_done": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "epoch_finished": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (lambda v: _is_int(v, 0, 2**32 - 1), "a seed from 0 to 4294967295"),
    "num_processes": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "moving_average": (lambda v: isinstance(v, dict) and _is_int(v.get("window"), 1)
                       and isinstance(v.get("values"), list) and all(map(_is_number, v["values"])),
                       "{window, values}"),
    "epoch_losses": (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers"),
}


def read_resumed(folder: str | None) -> TrainState | None:
    """--resume: the state, with every progress value the run reads present and of its kind."""
    if folder is None:
        return None
    resumed = read_state(folder)
    for key, (valid, expected) in PROGRESS_RULES.items():
        if key not in resumed.progress and key != "num_processes":
            raise LorakitError(f"--resume {folder}: its progress.json lacks {key}; it is damaged, or not a state "
                               "lorakit saved")
        if key in resumed.progress and not valid(resumed.progress[key]):
            raise LorakitError(f"--resume {folder}: progress.json {key} is {resumed.progress[key]!r}; expected "
                               f"{expected}")
    return resumed


def rehearse_restore(resumed: TrainState, network, optimizer, lr_scheduler, scaler) -> None:
    """Restore the state into stand-ins of the run's network, optimizer and schedule, and take one step: what
    does not fit (shapes, optimizer or schedule settings, RNG states) is one line before any weight is read. The
    global RNGs are put back afterwards, and the state itself is not touched (a loaded optimizer shares its
    tensors, and the step would change them)."""
    with preserved_rng():
        restore(copy.deepcopy(resumed), network, optimizer, lr_scheduler, scaler, rank=0)
        try:
            for param in network.parameters():
                param.grad = torch.zeros_like(param) if param.requires_grad else None
            optimizer.step()
            lr_scheduler.step()
        except Exception as error:  # noqa: BLE001 - whatever the libraries raise for a state that does not fit
            raise LorakitError(f"--resume: the state's optimizer or schedule does not fit this run "
                               f"({type(error).__name__}: {one_line(error)[:200]})") from None


def run_seed(config: TrainConfig, resumed: TrainState | None) -> int:
    """--seed, or a resumed state's seed (the batch order and every batch's noise derive from it)."""
    if resumed is not None:
        seed = int(resumed.progress["seed"])
        if config.seed is not None and config.seed != seed:
            logger.warning("--seed %d differs from the resumed state's seed %d; using the state's", config.seed, seed)
        return seed
    return config.seed if config.seed is not None else random.randrange(2**32)


def start_position(config: TrainConfig, steps_per_epoch: int, resumed: TrainState | None,
                   world: int) -> StartPosition:
    """Where the loop starts: a resumed state's exact position, or --initial_step / --initial_epoch (which win).

    --initial_step S is absolute: the run counts steps (names, `ss_steps`, the LR schedule, --max_train_steps)
    from S and starts in epoch S // steps_per_epoch + 1 — from that epoch's first batch, or, with
    --skip_until_initial_step, from the batch step S would have drawn. --initial_epoch E means S = (E-1) ×
    steps_per_epoch.
    """
    if config.initial_step is not None or config.initial_epoch is not None:
        if config.initial_step is not None:
            step = config.initial_step
        else:
            if config.initial_epoch < 1:
                raise LorakitError(f"--initial_epoch {config.initial_epoch}: epochs count from 1")
            step = (config.initial_epoch - 1) * steps_per_epoch
        if step < 0:
            raise LorakitError(f"--initial_step {step}: expected 0 or more")
        within = step % steps_per_epoch
        batches = within * config.gradient_accumulation_steps if config.skip_until_initial_step else 0
        return StartPosition(step, step // steps_per_epoch + 1, batches)
    if resumed is None:
        return StartPosition(0, 1, 0)
    progress = resumed.progress
    if progress["epoch_finished"]:
        return StartPosition(resumed.global_step, int(progress["epoch"]) + 1, 0)
    if int(progress.get("num_processes", 1)) != world:
        raise LorakitError(f"--resume: the state was saved mid-epoch by {progress.get('num_processes')} processes "
                           f"and this run has {world}; resume with the same number of processes (states saved at "
                           "an epoch's end resume with any number)")
    return StartPosition(resumed.global_step, int(progress["epoch"]), int(progress["batches_done"]))


def restore(state: TrainState, network, optimizer, lr_scheduler, scaler, rank: int) -> None:
    """Network weights, optimizer, LR schedule, gradient scaler and this rank's RNG states from a state
    folder."""
    try:
        network.load_state_dict(state.network)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise LorakitError(f"--resume: the state's network does not match this run's (check --network_dim, "
                           f"--network_args and the trained parts): {detail}") from None
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise LorakitError(f"--resume: the state's optimizer does not match this run's (--optimizer_type, "
                           f"learning rates): {error}") from None
    try:
        lr_scheduler.load_state_dict(state.scheduler)
        if state.scaler:  # a disabled scaler (the run is not fp16) ignores it
            scaler.load_state_dict(state.scaler)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise LorakitError(f"--resume: the state's LR schedule or loss scaler is damaged ({error})") from None
    if rank >= len(state.rng) and state.rng:
        logger.warning("--resume: the state was saved by %d processes; rank %d starts from rank 0's RNG states",
                       len(state.rng), rank)
    try:
        set_rng_state(state.rng[rank if rank < len(state.rng) else 0])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as error:
        raise LorakitError(f"--resume: the state's RNG states (rng.json) are damaged ({type(error).__name__}: "
                           f"{error})") from None


def advance_scheduler(lr_scheduler, steps: int) -> None:
    """Move the LR schedule to --initial_step without optimizer steps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*lr_scheduler.step", UserWarning)
        for _ in range(steps):
            lr_scheduler.step()


@dataclass
class RunProgress:
    """Where the loop is, and the loss figures a state carries on to the resumed run."""

    global_step: int
    epoch: int
    batches_done: int  # of `epoch`, per process
    epoch_finished: bool  # `epoch`'s end-of-epoch work is done
    moving: MovingAverage  # `loss/average`
    epoch_losses: list[float]  # `loss/epoch_average` of the epoch in progress
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this run

    @classmethod
    def starting(cls, start: StartPosition, resumed: TrainState | None, window: int) -> RunProgress:
        moving, epoch_losses = MovingAverage(window), []
        if resumed is not None and start.global_step == resumed.global_step:
            moving.load_state_dict(resumed.progress["moving_average"])
            epoch_losses = list(resumed.progress["epoch_losses"]) if start.batches_done else []
        return cls(start.global_step, start.epoch, start.batches_done, False, moving, epoch_losses)

    def add_batch_loss(self, loss: float) -> None:
        self.epoch_losses.append(loss)
        self.moving.add(loss)

    def step_done(self, epoch: int, batches_done: int, loss: float) -> None:
        self.global_step += 1
        self.epoch, self.batches_done, self.epoch_finished = epoch, batches_done, False
        self.losses.append(loss)

    def epoch_done(self, epoch: int, num_batches: int) -> None:
        """Finished, unless --max_train_steps ended it early (then a resumed longer run goes on from there)."""
        self.epoch_finished = (self.epoch, self.batches_done) == (epoch, num_batches)
        self.epoch = epoch

    def state(self, seed: int, world: int, max_train_steps: int) -> dict[str, Any]:
        """The `progress.json` of a state saved now."""
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_done": self.batches_done,
                "epoch_finished": self.epoch_finished, "seed": seed, "num_processes": world,
                "max_train_steps": max_train_steps, "moving_average": self.moving.state_dict(),
                "epoch_losses": [] if self.epoch_finished else list(self.epoch_losses)}
