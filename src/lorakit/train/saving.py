"""The run's saves (sd-scripts' `train_network.py`, `save_model` and the
`save_and_remove_state_*` calls): LoRA files with their metadata and save dtype, state folders beside them,
step / epoch / final cadence, `--save_last_n_*` rotation, free-space checks, and the interruption save.

Every process calls the `Checkpointer`'s methods at the same points (a state holds every rank's RNG states, and
the weights are compared across processes first); only the main process writes."""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from lorakit.config import TrainConfig
from lorakit.train.ema import WeightAverage
from lorakit.train.events import EventsLog
from lorakit.train.interrupt import TrainingInterrupted, resume_command
from lorakit.train.metadata import save_metadata
from lorakit.train.optimizers import optimizer_eval_mode, optimizer_train_mode
from lorakit.train.outputs import (OutputNames, last_epoch_to_remove, last_step_to_remove, prune,
                                   save_every_n_epochs_from_ratio, should_save_epoch, should_save_step)
from lorakit.train.processes import all_gather, check_in_sync
from lorakit.train.resume import RunProgress
from lorakit.train.state import check_free_space, gather_strings, rng_json, state_bytes, write_state

logger = logging.getLogger("lorakit")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "fp32": torch.float32}


class Checkpointer:
    """Owns what a save needs: output names, the run's metadata, the save dtype, the optimizer, schedule and
    gradient scaler whose states go into state folders, and the cadence and rotation flags."""

    def __init__(self, config: TrainConfig, *, network: torch.nn.Module, params: list[torch.Tensor], optimizer,
                 lr_scheduler, scaler: torch.amp.GradScaler, schedule_free: bool, metadata: dict[str, str],
                 seed: int, num_epochs: int, max_train_steps: int, accelerator: Accelerator,
                 events: EventsLog | None = None, ema: WeightAverage | None = None) -> None:
        self.config, self.network, self.params, self.ema = config, network, params, ema
        self.events = events or EventsLog(None)
        self.optimizer, self.lr_scheduler, self.scaler = optimizer, lr_scheduler, scaler
        self.schedule_free, self.metadata, self.accelerator = schedule_free, metadata, accelerator
        self.seed, self.num_epochs, self.max_train_steps = seed, num_epochs, max_train_steps
        self.names = OutputNames(Path(config.output_dir or "."), config.output_name, config.save_model_as)
        self.save_dtype = DTYPES.get(config.save_precision) if config.save_precision else None
        self.save_every_n_epochs = config.save_every_n_epochs
        if config.save_n_epoch_ratio:
            self.save_every_n_epochs = save_every_n_epochs_from_ratio(num_epochs, config.save_n_epoch_ratio)

    # ------------------------------------------------------------------ when the loop saves

    def after_step(self, run: RunProgress, stop: bool) -> None:
        """The step checkpoint of `--save_every_n_steps` and its rotation; when asked to `stop`, the interruption
        save (LoRA and state), then `TrainingInterrupted` with the resume command."""
        step = run.global_step
        step_save = should_save_step(step, self.config.save_every_n_steps) and step < self.max_train_steps
        if not (step_save or stop):
            return
        path = self.names.step_file(step)
        state_dir = self.save(path, run.epoch - 1, step, run if self.config.save_state or stop else None,
                              kind="step" if step_save else "interrupted")
        if step_save:
            self.rotate("step", step)
        if stop:
            raise self.interrupted(path, state_dir, step)

    def after_epoch(self, run: RunProgress, epoch: int) -> None:
        if should_save_epoch(epoch, self.num_epochs, self.save_every_n_epochs):
            self.save(self.names.epoch_file(epoch), epoch, run.global_step, run if self.config.save_state else None,
                      kind="epoch")
            self.rotate("epoch", epoch)

    def at_end(self, run: RunProgress) -> Path:
        final = self.names.final_file()
        with_state = self.config.save_state or self.config.save_state_on_train_end
        self.save(final, self.num_epochs, run.global_step, run if with_state else None, kind="final")
        return final

    # ------------------------------------------------------------------ the pieces

    def save(self, path: Path, epoch: int, step: int, run: RunProgress | None = None, kind: str = "step"
             ) -> Path | None:
        """The LoRA file (main process) and, given the loop's progress `run`, its state folder (with every rank's
        RNG states). Returns the state folder. `kind` (step, epoch, final, interrupted) goes to --events_log."""
        world = self.accelerator.num_processes
        rng = gather_strings(rng_json(), all_gather if world > 1 else None) if run is not None else None
        if world > 1:
            check_in_sync(self.params, self.accelerator.is_main_process)
        state_dir = self.names.state_dir(path) if run is not None else None
        if self.accelerator.is_main_process:
            needed = lora_bytes(self.network, self.save_dtype) * (2 if self.ema is not None else 1)
            needed += state_bytes(self.network, self.optimizer) if run is not None else 0
            check_free_space(path.parent, needed, path.name + (" and its state" if run is not None else ""))
            if self.schedule_free:
                optimizer_eval_mode(self.optimizer)
            metadata = save_metadata(self.metadata, steps=step, epoch=epoch, no_metadata=self.config.no_metadata)
            self.network.save_file(path, self.save_dtype, metadata)
            if self.ema is not None:
                self.ema.save(self.names.ema_file(path), self.save_dtype, metadata)
            if self.schedule_free:
                optimizer_train_mode(self.optimizer)
            logger.info("saved %s", path)
            if state_dir is not None:
                write_state(state_dir, network=self.network, optimizer=self.optimizer,
                            lr_scheduler=self.lr_scheduler, rng=rng, scaler=self.scaler,
                            progress=run.state(self.seed, world, self.max_train_steps),
                            ema=None if self.ema is None else self.ema.state_dict())
                logger.info("saved state %s", state_dir)
            self.events.write("saved", kind=kind, step=step, path=str(path.absolute()),
                              state=None if state_dir is None else str(state_dir.absolute()))
        self.accelerator.wait_for_everyone()
        return state_dir

    def rotate(self, kind: str, number: int) -> None:
        """Remove the files and states --save_last_n_{steps,epochs}[_state] no longer keeps after saving step
        (or epoch) `number`."""
        if not self.accelerator.is_main_process:
            return
        config, names = self.config, self.names
        if kind == "step":
            every, files, to_remove = config.save_every_n_steps, names.step_files(), last_step_to_remove
            keep, keep_states = config.save_last_n_steps, config.save_last_n_steps_state
        else:
            every, files, to_remove = self.save_every_n_epochs, names.epoch_files(), last_epoch_to_remove
            keep, keep_states = config.save_last_n_epochs, config.save_last_n_epochs_state
        last, last_state = (to_remove(number, every, n) for n in (keep, keep_states))
        prune(files, last, names, with_states=keep_states is None)
        for saved, folder in existing_states(names, kind).items():
            if last_state is not None and saved <= last_state:
                shutil.rmtree(folder, ignore_errors=True)

    def interrupted(self, path: Path, state_dir: Path, step: int) -> TrainingInterrupted:
        command = resume_command(sys.argv, state_dir)
        message = f"interrupted after step {step}: saved {path} and {state_dir}\nresume with:\n  {command}"
        if self.accelerator.is_main_process:
            print(message, flush=True)
        return TrainingInterrupted(message, state=state_dir, command=command)


def lora_bytes(network: torch.nn.Module, dtype: torch.dtype | None) -> int:
    return sum(t.numel() * (dtype.itemsize if dtype else t.element_size()) for t in network.state_dict().values())


def existing_states(names: OutputNames, kind: str) -> dict[int, Path]:
    """State folders of step or epoch checkpoints present in the output folder, by number."""
    if kind == "step":
        pattern = re.compile(re.escape(names.output_name or "at") + r"-step(\d{8})-state$")
    else:
        pattern = re.compile(re.escape(names.output_name or "epoch") + r"-(\d{6})-state$")
    if not names.output_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in names.output_dir.iterdir() if p.is_dir() and (m := pattern.match(p.name))}
