"""Output names, save cadence and rotation, as sd-scripts writes them (`library/train_util.py`:
`get_epoch_ckpt_name`, `get_step_ckpt_name`, `get_last_ckpt_name`, `get_remove_epoch_no`). Pure except `prune`."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutputNames:
    """Where each artefact of a run goes. `output_name=None` gives sd-scripts' defaults (epoch / at / last)."""

    output_dir: Path
    output_name: str | None
    save_model_as: str = "safetensors"

    @property
    def extension(self) -> str:
        return "." + self.save_model_as

    def epoch_file(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name or 'epoch'}-{epoch:06d}{self.extension}"

    def step_file(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name or 'at'}-step{step:08d}{self.extension}"

    def final_file(self) -> Path:
        return self.output_dir / f"{self.output_name or 'last'}{self.extension}"

    def state_dir(self, model_file: Path) -> Path:
        """The state folder saved beside a model file: `name-000001.safetensors` → `name-000001-state/`."""
        return model_file.with_name(model_file.name[: -len(self.extension)] + "-state")

    def ema_file(self, model_file: Path) -> Path:
        """The EMA weights saved beside a model file (--ema_decay): `name-000001-ema.safetensors`."""
        return model_file.with_name(model_file.name[: -len(self.extension)] + "-ema" + self.extension)

    def epoch_files(self) -> dict[int, Path]:
        """Existing epoch checkpoints, by epoch number."""
        pattern = re.compile(re.escape(self.output_name or "epoch") + r"-(\d{6})" + re.escape(self.extension) + "$")
        return self._existing(pattern)

    def step_files(self) -> dict[int, Path]:
        """Existing step checkpoints, by global step."""
        pattern = re.compile(re.escape(self.output_name or "at") + r"-step(\d{8})" + re.escape(self.extension) + "$")
        return self._existing(pattern)

    def _existing(self, pattern: re.Pattern[str]) -> dict[int, Path]:
        if not self.output_dir.is_dir():
            return {}
        found = {}
        for path in self.output_dir.iterdir():
            match = pattern.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found


def save_every_n_epochs_from_ratio(num_epochs: int, ratio: int) -> int:
    """`--save_n_epoch_ratio`: save about `ratio` times over the run, at least every epoch."""
    return max(num_epochs // ratio, 1)


def should_save_epoch(epoch: int, num_epochs: int, every: int | None) -> bool:
    """Epoch files every `every` epochs; the last epoch is written as the final file instead (1-based epochs)."""
    return bool(every) and epoch % every == 0 and epoch < num_epochs


def should_save_step(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def last_epoch_to_remove(epoch: int, every: int | None, keep_last: int | None) -> int | None:
    """Epoch files at or below this number are rotated out after saving `epoch` (`--save_last_n_epochs`)."""
    if not every or not keep_last:
        return None
    return epoch - every * keep_last


def last_step_to_remove(step: int, every: int | None, keep_last: int | None) -> int | None:
    """Step files at or below this step are rotated out after saving `step` (`--save_last_n_steps`).

    sd-scripts keeps the files of the last `keep_last` steps: it removes `step - keep_last - 1` rounded down to a
    multiple of `every`. We remove every older file too, so a resumed run also cleans up what came before it.
    """
    if not every or not keep_last:
        return None
    threshold = step - keep_last - 1
    return threshold - threshold % every


def prune(files: dict[int, Path], last_to_remove: int | None, names: OutputNames, with_states: bool) -> list[Path]:
    """Delete the files numbered at or below `last_to_remove` (and their state folders when asked)."""
    if last_to_remove is None:
        return []
    removed = []
    for number, path in sorted(files.items()):
        if number > last_to_remove:
            continue
        path.unlink(missing_ok=True)
        names.ema_file(path).unlink(missing_ok=True)
        removed.append(path)
        if with_states:
            shutil.rmtree(names.state_dir(path), ignore_errors=True)
    return removed
