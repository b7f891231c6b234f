"""Training states (sd-scripts' `accelerator.save_state` folders and `train_state.json`) without pickle:
everything a resumed run needs to continue bit for bit.

A state folder (`OutputNames.state_dir`, e.g. `my_lora-step00000500-state/`):
  network.safetensors      the trainable network's state_dict
  optimizer.safetensors    every tensor of `optimizer.state_dict()`, keyed by its path in the nested structure
  optimizer.json           the rest of it, each tensor replaced by {"__tensor__": key}
  scheduler.json           `lr_scheduler.state_dict()` (same encoding, tensors in scheduler.safetensors)
  scaler.json              the gradient scaler's `state_dict()`, only when the run scales its loss (fp16)
  rng.json                 per process rank: python `random`, numpy, torch CPU (+ CUDA) (byte states inlined as
                           base64); the loop's noise needs none: each batch's generator is seeded from its position
  progress.json            absolute global step, epoch, batches done in it, seed, log averages
  train_state.json         sd-scripts' {"current_epoch", "current_step"}, for tools that read it
  COMPLETE                 written last; a folder without it is never resumed from
The folder is written under a temporary name and renamed when complete (`lorakit.fileio.atomic_path`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError, one_line
from lorakit.fileio import atomic_path, kind_of

MARKER = "COMPLETE"
FORMAT = "lorakit-state-1"
_TENSOR, _INLINE, _TUPLE, _ITEMS, _DTYPE, _NDARRAY = (
    "__tensor__", "__tensor_bytes__", "__tuple__", "__items__", "__dtype__", "__ndarray__")


# ---------------------------------------------------------------- nested values ↔ JSON + tensors


def encode(value: Any, tensors: dict[str, torch.Tensor] | None, path: str = "") -> Any:
    """A JSON-ready copy of a nested state (dicts, lists, tuples, scalars, tensors, numpy arrays, dtypes).

    Tensors go into `tensors` under their path; with `tensors=None` they are inlined as base64 bytes (small RNG
    states)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").clone().contiguous()
        if tensors is None:
            raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            return {_INLINE: base64.b64encode(raw).decode("ascii"), "dtype": str(tensor.dtype).removeprefix("torch."),
                    "shape": list(tensor.shape)}
        tensors[path] = tensor
        return {_TENSOR: path}
    if isinstance(value, np.ndarray):
        return {_NDARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {_ITEMS: [[encode(k, None), encode(v, tensors, f"{path}.{i}")]
                         for i, (k, v) in enumerate(value.items())]}
    raise LorakitError(f"cannot save a {type(value).__name__} at {path or 'the top'} of a training state")


def decode(value: Any, tensors: Mapping[str, torch.Tensor] | None = None) -> Any:
    """The inverse of `encode`."""
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _INLINE in value:
        dtype = getattr(torch, value["dtype"])
        raw = bytearray(base64.b64decode(value[_INLINE]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(value["shape"]).clone()
    if _NDARRAY in value:
        return np.array(value[_NDARRAY], dtype=value["dtype"])
    if _DTYPE in value:
        return getattr(torch, value[_DTYPE])
    if _TUPLE in value:
        return tuple(decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {decode(k): decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: decode(v, tensors) for k, v in value.items()}


# ---------------------------------------------------------------- random number generators


def rng_state() -> dict[str, Any]:
    """This process's global RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_json() -> str:
    return json.dumps(encode(rng_state(), None))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Put every global RNG back as it was afterwards: sampling and validation never change training's stream."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# ---------------------------------------------------------------- the folder


@dataclass
class TrainState:
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]  # one per process rank, decoded
    progress: dict[str, Any]
    scaler: dict[str, Any] = field(default_factory=dict)  # empty: the run did not scale its loss
    ema: dict[str, torch.Tensor] | None = None  # the EMA of the trained weights (--ema_decay), by parameter name

    @property
    def global_step(self) -> int:
        return int(self.progress["global_step"])


def state_bytes(network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """About how many bytes a state takes: the network and the optimizer's tensors."""
    total = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    for per_param in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """A one-line LorakitError when `folder`'s disk has less than `needed` bytes (+5 % and 16 MiB) free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05 + 16 * 2**20:
        raise LorakitError(f"not enough disk space in {folder} to save {what}: about {needed / 2**20:.0f} MiB "
                           f"needed, {free / 2**20:.0f} MiB free; the files saved so far are kept")


def write_state(folder: Path, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
                rng: list[str], progress: Mapping[str, Any], scaler: torch.amp.GradScaler | None = None,
                ema: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write a complete state folder atomically. `rng` holds each rank's `rng_json`; `progress` the loop's
    position (global_step, epoch, ...); `ema` the averaged weights of --ema_decay."""
    with atomic_path(folder) as partial:
        partial.mkdir()
        save_file({k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()},
                  partial / "network.safetensors")
        for name, state in (("optimizer", optimizer.state_dict()), ("scheduler", lr_scheduler.state_dict())):
            tensors: dict[str, torch.Tensor] = {}
            encoded = encode(state, tensors)
            save_file(tensors, partial / f"{name}.safetensors")
            (partial / f"{name}.json").write_text(json.dumps(encoded))
        if scaler is not None and scaler.is_enabled():
            (partial / "scaler.json").write_text(json.dumps(encode(scaler.state_dict(), None)))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, partial / "ema.safetensors")
        (partial / "rng.json").write_text("[" + ",".join(rng) + "]")
        (partial / "progress.json").write_text(json.dumps({"format": FORMAT, **progress}, indent=2))
        (partial / "train_state.json").write_text(json.dumps(
            {"current_epoch": progress["epoch"], "current_step": progress["global_step"]}))
        (partial / MARKER).write_text(FORMAT + "\n")


def read_state(folder: str | Path) -> TrainState:
    """A complete state folder, or a one-line LorakitError saying why it cannot be resumed from."""
    folder = Path(folder)
    if kind_of(folder, "--resume") != "folder":
        raise LorakitError(f"--resume {folder}: no such folder{_last_complete_hint(folder)}")
    if not (folder / MARKER).is_file():
        if (folder / "optimizer.bin").exists() or list(folder.glob("random_states_*.pkl")):
            raise LorakitError(f"--resume {folder}: this is an accelerate/sd-scripts state (pickled files), which "
                               "lorakit does not load; start from its LoRA with --network_weights instead")
        raise LorakitError(f"--resume {folder}: the state is incomplete (no {MARKER} marker: its save was "
                           f"interrupted){_last_complete_hint(folder)}")
    try:
        loaded = {}
        for name in ("optimizer", "scheduler"):
            tensors = load_file(folder / f"{name}.safetensors")
            loaded[name] = decode(json.loads((folder / f"{name}.json").read_text()), tensors)
        scaler, ema = folder / "scaler.json", folder / "ema.safetensors"
        state = TrainState(
            network=load_file(folder / "network.safetensors"),
            optimizer=loaded["optimizer"],
            scheduler=loaded["scheduler"],
            rng=[decode(r) for r in json.loads((folder / "rng.json").read_text())],
            progress=json.loads((folder / "progress.json").read_text()),
            scaler=decode(json.loads(scaler.read_text())) if scaler.is_file() else {},
            ema=load_file(ema) if ema.is_file() else None,
        )
        if not isinstance(state.progress, dict) or not isinstance(state.progress.get("global_step"), int):
            raise ValueError("progress.json holds no global_step")
    except Exception as error:  # any damage to a state's files ends here, in one line
        raise LorakitError(f"--resume {folder}: the state is damaged ({type(error).__name__}: "
                           f"{one_line(error)[:200]}){_last_complete_hint(folder)}") from None
    return state


def complete_states(directory: Path) -> dict[Path, int]:
    """The complete lorakit states in a folder, with their global steps."""
    found = {}
    if directory.is_dir():
        for candidate in directory.iterdir():
            if candidate.is_dir() and (candidate / MARKER).is_file():
                try:
                    step = json.loads((candidate / "progress.json").read_text())["global_step"]
                except (OSError, ValueError, KeyError, TypeError):  # unreadable: not a state to offer
                    continue
                if isinstance(step, int) and not isinstance(step, bool):
                    found[candidate] = step
    return found


def _last_complete_hint(folder: Path) -> str:
    states = {path: step for path, step in complete_states(folder.parent).items()
              if path.resolve() != folder.resolve()}
    if not states:
        return f"; there is no complete state beside it in {folder.parent}"
    last = max(states, key=lambda p: (states[p], p.name))
    return f"; the last complete state beside it is {last} (step {states[last]})"


def gather_strings(text: str, gather: Callable[[torch.Tensor], list[torch.Tensor]] | None) -> list[str]:
    """Every process's `text`, in rank order (`gather` is an all-gather of equal-shaped tensors; None: one
    process)."""
    if gather is None:
        return [text]
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
    lengths = [int(n) for n in gather(torch.tensor([data.numel()]))]
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    padded[: data.numel()] = data
    return [bytes(chunk[:n].tolist()).decode("utf-8") for chunk, n in zip(gather(padded), lengths)]
