"""Training logs (sd-scripts' `train_network.py`, `generate_step_logs`): TensorBoard / wandb trackers,
sd-scripts' log keys, the moving average behind `loss/average`, and a loss/LR curve PNG drawn with Pillow.

The run folder is `{logging_dir}/{log_prefix}{YYYYmmddHHMMSS}/{log_tracker_name or "network_train"}/`, where
accelerate's TensorBoard tracker puts sd-scripts' event files. Only the main process opens trackers; the
others get a `TrainingLog` that records nothing.

Keys: `loss/current`, `loss/average` (moving average over the last epoch's worth of steps), `loss/epoch_average`,
`lr/<group>` and `lr/d*lr/<group>` (optimizers with a `d` estimate: D-Adaptation, Prodigy), `max_norm/keys_scaled`,
`max_norm/max_key_norm`, `norm/avg_key_norm`, `loss/validation/{step,epoch}_{average,divergence}`; the step is
the global step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

from lorakit.config import iter_flags
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_path, parse_toml, read_text
from lorakit.train.events import EventsLog

DEFAULT_TRACKER_NAME = "network_train"
# Never logged with --log_config: secrets, and paths (they name the user's machine and files).
SECRET_KEYS = frozenset(flag.name for flag in iter_flags() if flag.secret)
PATH_KEYS = frozenset({
    "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir", "conditioning_data_dir",
    "reg_data_dir", "output_dir", "logging_dir", "dataset_config", "sample_prompts", "resume", "network_weights",
    "log_tracker_config", "console_log_file", "config_file", "output_config", "base_weights", "events_log",
})
PATH_SUFFIXES = ("_dir", "_path", "_file")

History = Mapping[str, Sequence[tuple[int, float]]]


class MovingAverage:
    """Mean of the last `window` values (all values while fewer have come). `loss/average` uses one epoch's
    number of steps as the window, which is what sd-scripts' per-position ring buffer computes."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"moving-average window must be at least 1, got {window}")
        self._values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> float:
        """Add a value; return the new average."""
        self._values.append(float(value))
        return self.average

    @property
    def average(self) -> float:
        return math.fsum(self._values) / len(self._values) if self._values else math.nan

    def __len__(self) -> int:
        return len(self._values)

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state, so a resumed run continues the same average."""
        return {"window": self._values.maxlen, "values": list(self._values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._values = deque((float(v) for v in state["values"]), maxlen=int(state["window"]))


# ---------------------------------------------------------------- log records (pure)


def step_logs(current: float, average: float, learning_rates: Sequence[float], descriptions: Sequence[str],
              param_groups: Sequence[Mapping[str, Any]] = (),
              max_norm: tuple[int, float, float] | None = None) -> dict[str, float]:
    """One optimizer step's values. `descriptions` name the parameter groups (`textencoder`, `unet`, ...);
    `param_groups` (the optimizer's) add `lr/d*lr/<group>` where a group carries a `d` estimate; `max_norm` is
    (keys scaled, average key norm, maximum key norm) from --scale_weight_norms."""
    logs = {"loss/current": float(current), "loss/average": float(average)}
    for i, (lr, name) in enumerate(zip(learning_rates, descriptions, strict=True)):
        logs[f"lr/{name}"] = float(lr)
        if i < len(param_groups) and "d" in param_groups[i]:
            logs[f"lr/d*lr/{name}"] = float(param_groups[i]["d"]) * float(param_groups[i]["lr"])
    if max_norm is not None:
        keys_scaled, mean_norm, maximum_norm = max_norm
        logs["max_norm/keys_scaled"] = float(keys_scaled)
        logs["max_norm/max_key_norm"] = float(maximum_norm)
        logs["norm/avg_key_norm"] = float(mean_norm)
    return logs


def epoch_logs(epoch_average: float) -> dict[str, float]:
    return {"loss/epoch_average": float(epoch_average)}


def validation_logs(kind: Literal["step", "epoch"], average: float, train_average: float) -> dict[str, float]:
    """Validation loss and its divergence from training's moving average (validation − training)."""
    return {f"loss/validation/{kind}_average": float(average),
            f"loss/validation/{kind}_divergence": float(average) - float(train_average)}


def sanitized_config(config: Any) -> dict[str, Any]:
    """The run's settings for --log_config: no secrets, no paths; values are bool/int/float/str/None, anything
    else as text. `config` is a dataclass (TrainConfig) or a mapping."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    clean = {}
    for key, value in values.items():
        if key in SECRET_KEYS or key in PATH_KEYS or key.endswith(PATH_SUFFIXES):
            continue
        clean[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return clean


def run_dir_name(log_prefix: str | None, when: float | None = None) -> str:
    """`{prefix}{YYYYmmddHHMMSS}` (local time), sd-scripts' run folder name."""
    return (log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime(when))


# ---------------------------------------------------------------- trackers


class TrainingLog:
    """Sends values to the chosen trackers and keeps every scalar for the curve PNG.

    `log_with`: "tensorboard", "wandb", "all" or None (TensorBoard when `logging_dir` is set, else nothing).
    `init_kwargs`: per-tracker keyword arguments (`{"tensorboard": {...}, "wandb": {...}}`, --log_tracker_config).
    `enabled=False` (processes other than the main one) opens nothing and records nothing. `events`: the run's
    --events_log, which gets every value and sample point too.
    """

    def __init__(self, *, logging_dir: str | Path | None = None, log_with: str | None = None,
                 log_prefix: str | None = None, tracker_name: str | None = None,
                 config: Mapping[str, Any] | None = None, wandb_run_name: str | None = None,
                 wandb_api_key: str | None = None, init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                 enabled: bool = True, events: EventsLog | None = None) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.events = events if enabled and events is not None else EventsLog(None)
        self.run_dir: Path | None = None
        self._tensorboard = None
        self._wandb = None
        self.enabled = enabled
        if not enabled:
            return
        trackers = _trackers(log_with, logging_dir)
        init_kwargs = init_kwargs or {}
        name = tracker_name or DEFAULT_TRACKER_NAME
        if logging_dir is not None:
            self.run_dir = Path(logging_dir) / run_dir_name(log_prefix) / name
        if "tensorboard" in trackers:
            self._tensorboard = _open_tensorboard(self.run_dir, config, init_kwargs.get("tensorboard", {}))
        if "wandb" in trackers:
            self._wandb = _open_wandb(name, wandb_run_name, wandb_api_key, config, self.run_dir,
                                      init_kwargs.get("wandb", {}))

    @classmethod
    def from_config(cls, config: Any, *, enabled: bool = True, events: EventsLog | None = None) -> TrainingLog:
        """Built from the TrainConfig's logging flags (--logging_dir, --log_with, --log_prefix, ...)."""
        init_kwargs = _read_tracker_config(config.log_tracker_config) if config.log_tracker_config else None
        return cls(logging_dir=config.logging_dir, log_with=config.log_with, log_prefix=config.log_prefix,
                   tracker_name=config.log_tracker_name,
                   config=sanitized_config(config) if config.log_config else None,
                   wandb_run_name=config.wandb_run_name, wandb_api_key=config.wandb_api_key,
                   init_kwargs=init_kwargs, enabled=enabled, events=events)

    def log(self, values: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.history.setdefault(key, []).append((step, float(value)))
            if self._tensorboard is not None:
                self._tensorboard.add_scalar(key, value, global_step=step)
        self.events.write("log", step=step, values={key: float(value) for key, value in values.items()})
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    def log_images(self, images: Iterable[str | Path], step: int) -> None:
        """Sample images to wandb as `sample_{i}` (TensorBoard users open the sample folder) and --events_log."""
        if not self.enabled:
            return
        self.events.write("samples", step=step, images=[str(Path(path).absolute()) for path in images])
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"sample_{i}": wandb.Image(str(path)) for i, path in enumerate(images)}, step=step)

    def write_curves(self, path: str | Path) -> Path | None:
        """The loss/LR curve PNG of everything logged so far (None when nothing was)."""
        if not self.enabled or not self.history:
            return None
        write_curves_png(self.history, path)
        return Path(path)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# What TensorBoard's SummaryWriter takes besides its folder (a wrong type only fails in its writer thread).
TENSORBOARD_OPTIONS = {"comment": (str,), "purge_step": (int,), "max_queue": (int,), "flush_secs": (int, float),
                       "filename_suffix": (str,)}


def check_logging(config: Any) -> None:
    """What `TrainingLog.from_config` would refuse, found before any weights load: the trackers, wandb being
    installed, the --log_tracker_config file."""
    trackers = _trackers(config.log_with, config.logging_dir)
    if "wandb" in trackers and importlib.util.find_spec("wandb") is None:
        raise LorakitError("--log_with wandb: wandb is not installed; install it with pip install 'lorakit[wandb]'")
    if config.log_tracker_config:
        tables = _read_tracker_config(config.log_tracker_config)
        for key, value in tables.get("tensorboard", {}).items():
            kinds = TENSORBOARD_OPTIONS.get(key)
            if kinds is None:
                raise LorakitError(f"--log_tracker_config {config.log_tracker_config}: [tensorboard] {key}: unknown "
                                   f"option; expected one of {', '.join(TENSORBOARD_OPTIONS)}")
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise LorakitError(f"--log_tracker_config {config.log_tracker_config}: [tensorboard] {key} = "
                                   f"{value!r}; expected {' or '.join(kind.__name__ for kind in kinds)}")


def _trackers(log_with: str | None, logging_dir: str | Path | None) -> set[str]:
    if log_with is None:
        return {"tensorboard"} if logging_dir is not None else set()
    choices = {"tensorboard": {"tensorboard"}, "wandb": {"wandb"}, "all": {"tensorboard", "wandb"}}
    if log_with not in choices:
        raise LorakitError(f"--log_with is {log_with!r}; expected tensorboard, wandb or all")
    if "tensorboard" in choices[log_with] and logging_dir is None:
        raise LorakitError(f"--log_with {log_with} writes TensorBoard logs, which need --logging_dir; none was given")
    return choices[log_with]


def _open_tensorboard(run_dir: Path, config: Mapping[str, Any] | None, kwargs: Mapping[str, Any]):
    from torch.utils.tensorboard import SummaryWriter

    try:
        writer = SummaryWriter(log_dir=str(run_dir), **kwargs)
    except TypeError as error:
        raise LorakitError(f"--log_tracker_config [tensorboard]: {error}") from None
    if config is not None:
        writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```")
    return writer


def _open_wandb(project: str, run_name: str | None, api_key: str | None, config: Mapping[str, Any] | None,
                run_dir: Path | None, kwargs: Mapping[str, Any]):
    try:
        import wandb
    except ImportError:
        raise LorakitError("--log_with wandb: wandb is not installed; install it with pip install 'lorakit[wandb]'"
                           ) from None
    if api_key is not None:
        wandb.login(key=api_key)
    options = {"project": project, "name": run_name, "config": dict(config) if config else None, **kwargs}
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        options.setdefault("dir", str(run_dir))
    return wandb.init(**options)


def _read_tracker_config(path: str) -> dict[str, dict[str, Any]]:
    data = parse_toml(read_text(path, "--log_tracker_config"), path, "--log_tracker_config")
    for key, value in data.items():
        if key not in ("tensorboard", "wandb") or not isinstance(value, dict):
            raise LorakitError(f"--log_tracker_config {path}: key {key!r}; expected [tensorboard] or [wandb] tables")
    return data


# ---------------------------------------------------------------- curve PNG

CURVE_SIZE = (1000, 760)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
_MARGIN_LEFT, _MARGIN_RIGHT = 90, 20


def write_curves_png(history: History, path: str | Path) -> None:
    """Loss curves (top) and learning rates (bottom) against the global step, as a PNG. Each legend entry gives
    the series' last, minimum and maximum value; the axes are labelled with their ranges."""
    width, height = CURVE_SIZE
    image = Image.new("RGB", CURVE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    losses = {k: v for k, v in history.items() if k.startswith("loss/")}
    rates = {k: v for k, v in history.items() if k.startswith("lr/")}
    middle = height * 55 // 100
    _panel(draw, font, losses, "loss", (_MARGIN_LEFT, 30, width - _MARGIN_RIGHT, middle - 50))
    _panel(draw, font, rates, "learning rate", (_MARGIN_LEFT, middle + 20, width - _MARGIN_RIGHT, height - 50))
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def _panel(draw: ImageDraw.ImageDraw, font, series: Mapping[str, Sequence[tuple[int, float]]], label: str,
           box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    draw.text((left, top - 22), label, fill="black", font=font)
    draw.rectangle(box, outline="black")
    points = [(s, v) for values in series.values() for s, v in values if math.isfinite(v)]
    if not points:
        draw.text((left + 10, top + 10), "nothing logged", fill="gray", font=font)
        return
    x_low, x_high = _range([s for s, _ in points])
    y_low, y_high = _range([v for _, v in points])

    def at(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x_low) / (x_high - x_low) * (right - left),
                bottom - (value - y_low) / (y_high - y_low) * (bottom - top))

    for i in range(5):  # gridlines and tick labels, including both ends
        fraction = i / 4
        y = bottom - fraction * (bottom - top)
        x = left + fraction * (right - left)
        draw.line([(left, y), (right, y)], fill="#e5e5e5")
        draw.text((left - 6, y), f"{y_low + fraction * (y_high - y_low):.4g}", fill="black", font=font, anchor="rm")
        draw.text((x, bottom + 6), f"{x_low + fraction * (x_high - x_low):.0f}", fill="black", font=font, anchor="ma")
    draw.text(((left + right) / 2, bottom + 24), "step", fill="black", font=font, anchor="ma")
    draw.rectangle(box, outline="black")
    legend = []
    for i, (key, values) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        finite = [(s, v) for s, v in values if math.isfinite(v)]
        line = [at(s, v) for s, v in finite]
        if len(line) == 1:
            x, y = line[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        elif line:
            draw.line(line, fill=colour, width=2 if key.endswith("average") else 1)
        if finite:
            numbers = [v for _, v in finite]
            legend.append((colour, f"{key}  last {numbers[-1]:.4g}  min {min(numbers):.4g}  max {max(numbers):.4g}"))
    if legend:  # top right, on white so the curves do not hide it
        text_width = max(draw.textlength(text, font=font) for _, text in legend)
        x = right - text_width - 36
        draw.rectangle((x - 6, top + 4, right - 4, top + 10 + 17 * len(legend)), fill="white", outline="#bbbbbb")
        for i, (colour, text) in enumerate(legend):
            y = top + 8 + i * 17
            draw.line([(x, y + 7), (x + 18, y + 7)], fill=colour, width=3)
            draw.text((x + 24, y), text, fill="black", font=font)


def _range(values: Sequence[float]) -> tuple[float, float]:
    """(min, max), widened when the values are all equal so the axis has a span."""
    low, high = min(values), max(values)
    if low == high:
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high
