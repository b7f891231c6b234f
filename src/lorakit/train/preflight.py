"""The checks every run makes before any weight is read; `--dry_run` prints what they found and stops.

Each input is checked the way the run will use it, so "all inputs checked" means a real run gets past set-up:
- paths: the kind of each input a flag names (file or folder), outputs in folders that can be written, file
  names the system accepts;
- the model: built on the meta device from the checkpoint's tensor names and shapes (folders: from their
  configs), and `--vae` the same way (`load_sdxl(device="meta")`);
- the network on that model: `--network_module`, `--network_args`, `--dim_from_weights`, the names, shapes and
  values of `--network_weights` and `--base_weights`, and its size against the device's memory;
- the optimizer and the LR schedule: built over stand-ins of the network's parameter groups on the training
  device and stepped once; the schedule's learning rates are finite from the first step to the last; a
  `--resume` state restored into stand-ins of the run's network, optimizer and schedule and stepped once;
- memory: the training step's peak part by part, and with `--gradient_checkpointing` the U-Net blocks to
  checkpoint (`lorakit.train.memory`);
- logging (`--log_with`, `--log_tracker_config`), `--metadata_thumbnail`, the samplers of the sample prompts;
- the CPU: bf16 on a CPU without native bf16 is measured and said in one warning line.
The datasets (every image decoded), `--resume` and `--sample_prompts` are read before this, by the run itself.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.config import TrainConfig
from lorakit.errors import LorakitError
from lorakit.fileio import describe_os_error, kind_of
from lorakit.families.base import ModelFamily
from lorakit.models.components import Components
from lorakit.models.loading import check_hub_model, is_hub_id
from lorakit.network.apply import file_network
from lorakit.network.io import match_network_weights
from lorakit.network.network import LoRANetwork
from lorakit.network.plugins import import_network_module, served_natively
from lorakit.train.ema import WeightAverage
from lorakit.train.fused import check_fused_backward
from lorakit.train.grad_scaler import gradient_scaler
from lorakit.train.logs import check_logging
from lorakit.train.memory import MemoryEstimate, Workload, estimate_memory, network_parts
from lorakit.train.metadata import thumbnail_url
from lorakit.train.resume import rehearse_restore
from lorakit.train.run_setup import (base_weight_multipliers, make_lr_scheduler, make_optimizer, network_dtype,
                                     new_network)
from lorakit.train.sample_prompts import SamplePrompt
from lorakit.train.sampling import make_scheduler
from lorakit.train.state import TrainState

logger = logging.getLogger("lorakit")

GIB = 2**30
NAME_MAX = 255  # bytes of one file-name component on Linux, macOS and Windows file systems
LONGEST_SUFFIX = "-step00000000-state.safetensors.tmp-4194304"  # the longest name a save derives from output_name
SLOW_BF16 = 0.5  # bf16 matrix products at less than half the fp32 rate: the CPU has no native bf16


@dataclass
class Preflight:
    """What the checks found, for the dry run's report, and the memory estimate with its checkpointing plan (None
    for a model still on the hub)."""

    lines: list[str]
    memory: MemoryEstimate | None


def preflight(config: TrainConfig, family: ModelFamily, prompts: list[SamplePrompt], resumed: TrainState | None,
              max_train_steps: int, device: torch.device, world: int, workload: Workload) -> Preflight:
    check_input_paths(config)
    check_output_paths(config)
    check_logging(config)
    thumbnail_url(config.metadata_thumbnail)
    for sampler in sorted({prompt.sampler for prompt in prompts}):
        make_scheduler(sampler, config.v_parameterization)  # a sampler's missing package (lms: scipy) fails here
    lines = []
    model = rehearse_model(config, family)
    network = None if model is None else rehearse_network(config, family, model)
    state_bytes = rehearse_optimization(config, network_groups(config, network), max_train_steps, device, world)
    if model is None:
        lines.append(f"model: {config.pretrained_model_name_or_path} is on the hub, not in the local cache: it is "
                     "downloaded when the run starts, so its shapes, the network on it and its memory are not checked "
                     "here" + ("; --gradient_checkpointing checkpoints every U-Net block" if
                               config.gradient_checkpointing else ""))
        memory = None
    else:
        check_network_fits(config, network, state_bytes)
        memory = estimate_memory(config, family, model, network, workload, device, state_bytes)
        lines.append(memory.table())
    if resumed is not None and network is not None:
        rehearse_resume(config, resumed, network, max_train_steps, device)
    lines.append(cpu_precision(config, device))
    return Preflight([line for line in lines if line], memory)


# ---------------------------------------------------------------------------------------------------- paths


def check_input_paths(config: TrainConfig) -> None:
    if config.vae is not None and kind_of(config.vae, "--vae") not in ("file", "folder"):
        raise LorakitError(f"--vae {config.vae}: no such file or folder; expected a VAE .safetensors file or a "
                           "diffusers VAE folder")
    files = [("--network_weights", config.network_weights)] + [("--base_weights", p) for p in config.base_weights or ()]
    for flag, path in files:
        if path is not None and kind_of(path, flag) != "file":
            raise LorakitError(f"{flag} {path}: no such file; expected a LoRA .safetensors file")


def check_output_paths(config: TrainConfig) -> None:
    """Output folders that exist are folders the run may write in, or can be made; saved names fit the system."""
    for flag, path in (("--output_dir", config.output_dir or "."), ("--logging_dir", config.logging_dir),
                       ("--tokenizer_cache_dir", config.tokenizer_cache_dir)):
        if path is not None:
            writable_folder(path, flag)
    for flag, path in (("--console_log_file", config.console_log_file), ("--events_log", config.events_log)):
        if path and kind_of(path, flag) not in (None, "file"):
            raise LorakitError(f"{flag} {path}: not a regular file")
    name = config.output_name or "last"
    for part in Path(name).parts:
        if len(os.fsencode(part + LONGEST_SUFFIX)) > NAME_MAX:
            raise LorakitError(f"--output_name {name[:60]}...: {len(os.fsencode(name))} bytes; the files saved "
                               f"under it would exceed the {NAME_MAX}-byte limit of a file name: shorten it")


def writable_folder(path: str, flag: str) -> None:
    """`path` is a folder the run can write in, or can be created: its nearest existing parent is such a folder."""
    current = Path(path).absolute()
    while True:
        kind = kind_of(current, flag)
        if kind is not None:
            break
        current = current.parent
    if kind != "folder":
        what = "is a file" if current == Path(path).absolute() else f"is inside {current}, which is a file"
        raise LorakitError(f"{flag} {path} {what}; expected a folder")
    where = "" if current == Path(path).absolute() else f" (its nearest existing folder {current})"
    try:  # an unnamed temporary file: permissions, read-only or virtual file systems all answer (root included)
        with tempfile.TemporaryFile(dir=current):
            pass
    except OSError as error:
        raise LorakitError(f"{flag} {path}{where}: cannot write there ({describe_os_error(error)})") from None


# ---------------------------------------------------------------------------------------------------- rehearsals


def rehearse_model(config: TrainConfig, family: ModelFamily) -> Components | None:
    """The model on the meta device, or None for a hub id that is not in the local cache (checked at load)."""
    source = config.pretrained_model_name_or_path
    local = kind_of(source, "--pretrained_model_name_or_path") is not None
    try:
        return family.load(source, vae=config.vae, dtype=torch.float32, device="meta",
                           tokenizer_cache_dir=config.tokenizer_cache_dir)
    except LorakitError:
        if local or not is_hub_id(source):
            raise
    check_hub_model(source)
    return None


def rehearse_network(config: TrainConfig, family: ModelFamily, model: Components) -> LoRANetwork | None:
    """The run's network built on the meta model, with every LoRA file it reads checked against it; None for a
    plug-in's network (its module is imported; it builds its network at set-up)."""
    train_unet = not config.network_train_text_encoder_only
    train_text_encoder = not config.network_train_unet_only
    if not served_natively(config.network_module):
        import_network_module(config.network_module)
        return None
    encoders = model.text_encoders if train_text_encoder else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on copying into meta tensors
        network = new_network(config, family.lora, model.unet, encoders, None, train_unet, train_text_encoder)
        if config.network_weights:
            match_network_weights(network, config.network_weights, model.unet, family.lora)
        for path, multiplier in zip(config.base_weights or (), base_weight_multipliers(config)):
            file_network(model, path, multiplier, family.lora)
    if not network.loras:
        raise LorakitError("the network has no LoRA modules: nothing to train (check --network_args and "
                           "--network_train_*_only)")
    if config.scale_weight_norms and network.kinds - {"lora"}:
        raise LorakitError(f"--scale_weight_norms applies to LoRA's up and down matrices, not to "
                           f"{', '.join(sorted(network.kinds - {'lora'}))} modules")
    return network


def network_groups(config: TrainConfig, network: LoRANetwork | None) -> list[dict]:
    """The optimizer groups the run will build, without their tensors (names and learning rates); one group at
    --learning_rate when the network is not built here (a plug-in's, or a model still on the hub)."""
    if network is None:
        return [{"name": "network", "lr": config.learning_rate}]
    groups = network.parameter_groups(config.unet_lr, config.text_encoder_lr1, config.text_encoder_lr2,
                                      config.learning_rate)
    if not groups:
        raise LorakitError("every learning rate is 0 (--learning_rate, --unet_lr, --text_encoder_lr*): nothing "
                           "would train")
    for group in groups:
        if not math.isfinite(group["lr"]):
            raise LorakitError(f"the learning rate of the {group['name']} group is {group['lr']}: check the "
                               "learning rates and the loraplus_* ratios of --network_args")
    return [{key: value for key, value in group.items() if key != "params"} for group in groups]


def rehearse_optimization(config: TrainConfig, groups: list[dict], max_train_steps: int, device: torch.device,
                          world: int) -> float:
    """Build --optimizer_type with --optimizer_args over stand-in tensors, step it once (gradients with zeros
    among them, as a fresh LoRA has), check the weights stay finite, and build the LR schedule the run will use;
    what the libraries refuse becomes one line naming the flags. Returns the optimizer state's bytes per trained
    parameter."""
    # Matrices of the network's dtype, large enough for the state per parameter a LoRA's matrices get (Adafactor
    # factors matrices only; bitsandbytes keeps 32-bit state below 4096 elements).
    dtype = network_dtype(config)
    stand_ins = [{**group, "params": [torch.zeros(64, 128, device=device, dtype=dtype, requires_grad=True)]}
                 for group in groups]
    what = f"--optimizer_type {config.optimizer_type}" + (
        f" --optimizer_args {' '.join(config.optimizer_args)}" if config.optimizer_args else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _refusal(what):
            built = make_optimizer(config, stand_ins)
            for group in built.optimizer.param_groups:
                for param in group["params"]:
                    param.grad = torch.tensor([1e-3, 0.0, -1e-3, 0.0, 2e-3, 0.0, -2e-3, 0.0], device=device,
                                              dtype=dtype).repeat(1024).view(64, 128)
            built.optimizer.step()
        state_bytes = sum(value.numel() * value.element_size() for state in built.optimizer.state.values()
                          for value in state.values() if isinstance(value, torch.Tensor) and value.dim())
        if not all(torch.isfinite(p).all() for group in built.optimizer.param_groups for p in group["params"]):
            raise LorakitError(f"{what}: one step at the groups' learning rates gives NaN or infinite weights; check "
                               "the arguments and the learning rates (eps=0 divides by a fresh LoRA's zero gradients)")
        gradient_scaler(config.mixed_precision, full_fp16=config.full_fp16,
                        fused_backward_pass=config.fused_backward_pass, device_type=device.type)
        if config.fused_backward_pass:
            check_fused_backward(built.optimizer_class, config.gradient_accumulation_steps, world)
        schedule = config.lr_scheduler_type or built.lr_scheduler or config.lr_scheduler
        with _refusal(f"--lr_scheduler {schedule}" + (f" --lr_scheduler_args {' '.join(config.lr_scheduler_args)}"
                                                      if config.lr_scheduler_args else "")):
            _check_learning_rates(make_lr_scheduler(config, built, max_train_steps), max_train_steps, schedule)
    return state_bytes / sum(p.numel() for group in stand_ins for p in group["params"])


def rehearse_resume(config: TrainConfig, resumed: TrainState, network: LoRANetwork, max_train_steps: int,
                    device: torch.device) -> None:
    """--resume into stand-ins of the run's network (real tensors of its shapes, uninitialised), optimizer,
    schedule and scaler, and one step (`lorakit.train.resume.rehearse_restore`)."""
    network.to_empty(device=device)
    network.to(network_dtype(config))
    groups = network.parameter_groups(config.unet_lr, config.text_encoder_lr1, config.text_encoder_lr2,
                                      config.learning_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = make_optimizer(config, groups)
        scheduler = make_lr_scheduler(config, built, max_train_steps)
        scaler = gradient_scaler(config.mixed_precision, full_fp16=config.full_fp16,
                                 fused_backward_pass=config.fused_backward_pass, device_type=device.type)
        rehearse_restore(resumed, network, built.optimizer, scheduler, scaler)
    if config.ema_decay is not None and resumed.ema is not None:
        WeightAverage(network, config.ema_decay, device="cpu").load_state_dict(resumed.ema, str(config.resume))


def _check_learning_rates(scheduler, max_train_steps: int, schedule: str) -> None:
    """The schedule's learning rates at its first steps, its middle and its end are finite and not negative (a
    LambdaLR is evaluated at those steps; another scheduler is stepped a few times)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    bases = scheduler.base_lrs
    if lambdas is not None:
        steps = sorted({0, 1, 2, max_train_steps // 2, max(max_train_steps - 1, 0), max_train_steps})
        found = [(step, (base or 0.0) * function(step)) for step in steps for base, function in zip(bases, lambdas)]
    else:
        found = []
        for step in range(min(max_train_steps, 3)):
            found += [(step, lr) for lr in scheduler.get_last_lr()]
            scheduler.optimizer.step()
            scheduler.step()
    for step, lr in found:
        if lr is None:
            continue
        if not (math.isfinite(lr) and lr >= 0):
            raise LorakitError(f"--lr_scheduler {schedule} gives the learning rate {lr} at step {step}: check the "
                               "--lr_* values")


class _refusal:
    """Turns what a library raises for the user's settings into one LorakitError naming the flags."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or isinstance(error, LorakitError) or not isinstance(error, Exception):
            return False
        text = str(error).strip().splitlines()
        raise LorakitError(f"{self.what}: refused ({type(error).__name__}: {text[0] if text else ''})") from None


# ---------------------------------------------------------------------------------------------------- estimates


def check_network_fits(config: TrainConfig, network: LoRANetwork | None, state_bytes: float) -> None:
    """Refuses a network that with its gradients and optimizer state alone would not fit the device."""
    parameters = sum(p.numel() for p in network.parameters()) if network is not None else 0
    size = sum(part for _, part in network_parts(config, network, state_bytes))
    available = device_memory()
    if size > available:
        raise LorakitError(f"the LoRA network would have {parameters:,} parameters ({size / GIB:.1f} GiB with "
                           f"gradients and optimizer state), more than the {available / GIB:.1f} GiB of this "
                           "machine: lower --network_dim (or conv_dim in --network_args)")


def device_memory() -> int:
    """Bytes of memory of the training device: the GPU's, else the machine's."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    import psutil

    return psutil.virtual_memory().total


def cpu_precision(config: TrainConfig, device: torch.device) -> str:
    """On the CPU: its capability and, when the run computes in bf16, the measured bf16 and fp32 matrix-product
    rates; a warning line when bf16 is the slower by far (AVX2-only CPUs: hundreds of times)."""
    if device.type != "cpu":
        return ""
    capability = torch.backends.cpu.get_cpu_capability()
    if config.mixed_precision != "bf16":
        return f"CPU: {capability}; computing in fp32 (--mixed_precision {config.mixed_precision})"
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    if bf16 < SLOW_BF16 * fp32:
        logger.warning("--mixed_precision bf16 on a CPU without native bf16 (%s): bf16 matrix products run at %.1f "
                       "GFLOP/s against %.1f in fp32 (%.0fx slower, one thread); use --mixed_precision no", capability,
                       bf16 / 1e9, fp32 / 1e9, fp32 / bf16)
        verdict = "no native bf16"
    else:
        verdict = "native bf16"
    return (f"CPU: {capability} ({verdict}): matrix products on one thread {bf16 / 1e9:.1f} GFLOP/s in bf16, "
            f"{fp32 / 1e9:.1f} in fp32")


def matmul_rate(dtype: torch.dtype, size: int = 256, repeats: int = 5) -> float:
    """FLOP/s of a `size`² matrix product in `dtype` on one CPU thread: the fastest of `repeats` after a warm-up
    (one thread and the fastest, because other work on the machine only ever slows a product down, and threads
    waiting for a busy core slow it down most)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b
        fastest = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            fastest = min(fastest, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / fastest
