"""Set-up pieces of a run that read the flags: the accelerator, attention, fp8 base weights, the network (or a
plug-in's) with its weights and groups."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os

import torch
from accelerate import Accelerator

from lorakit.config import TrainConfig
from lorakit.errors import LorakitError
from lorakit.models.float8 import store_in_float8
from lorakit.network.apply import network_from_file
from lorakit.network.io import read_lora
from lorakit.network.plugins import LORAKIT_MODULE, PluginNetwork, TrainableNetwork, create_network, served_natively
from lorakit.network.targets import LoRALayout
from lorakit.train.optimizers import BuiltOptimizer, build_optimizer
from lorakit.train.schedulers import build_scheduler

logger = logging.getLogger("lorakit")


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype of the frozen weights and of the step's arithmetic: --mixed_precision's, else float32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


def network_dtype(config: TrainConfig) -> torch.dtype:
    """The trained weights' dtype: float32 unless --full_bf16 / --full_fp16."""
    return torch.bfloat16 if config.full_bf16 else torch.float16 if config.full_fp16 else torch.float32


def make_accelerator(config: TrainConfig) -> Accelerator:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise LorakitError("--mixed_precision fp16 needs a GPU: CPUs compute fp16 about 150x slower than bf16; use "
                           "--mixed_precision bf16 (or no) on this machine")
    kwargs = []
    if config.ddp_timeout or config.ddp_gradient_as_bucket_view or config.ddp_static_graph:
        from datetime import timedelta

        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
        if config.ddp_timeout:
            kwargs.append(InitProcessGroupKwargs(timeout=timedelta(minutes=config.ddp_timeout)))
        kwargs.append(DistributedDataParallelKwargs(gradient_as_bucket_view=config.ddp_gradient_as_bucket_view,
                                                    static_graph=config.ddp_static_graph))
    # Several processes on a machine without CUDA (torchrun, `accelerate launch --multi_gpu`): accelerate sets up
    # gloo on the CPU only when told to.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    forget_other_precision(config.mixed_precision)
    return Accelerator(mixed_precision=config.mixed_precision, kwargs_handlers=kwargs, cpu=cpu)


def forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses an Accelerator with another mixed precision
    ("AcceleratorState has already been initialized"); a second run in the same process (the demo, benchmarks,
    tests) with another precision starts that state afresh. The process group (accelerate's PartialState) is
    kept: it does not depend on the precision."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def configure_attention(config: TrainConfig, *models) -> None:
    """SDPA is diffusers' default (--sdpa, and --mem_eff_attn maps to it); xformers when asked and installed."""
    if config.xformers:
        if importlib.util.find_spec("xformers") is None:
            raise LorakitError("--xformers: the xformers package is not installed; drop the flag (lorakit uses "
                               "torch SDPA by default) or pip install xformers")
        for model in models:
            model.enable_xformers_memory_efficient_attention()


def release_freed_memory() -> None:
    """Hand the memory of released models back to the OS: glibc keeps freed heap pages, and the training steps'
    allocations would then come on top of them in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to hand back this way
        pass


def store_base_weights(config: TrainConfig, unet, text_encoders, compute_dtype: torch.dtype) -> None:
    """--fp8_base / --fp8_base_unet: frozen weights stored as float8_e4m3fn, each layer computed in the mixed
    dtype (`lorakit.models.float8`)."""
    if not (config.fp8_base or config.fp8_base_unet):
        return
    if compute_dtype == torch.float32:
        raise LorakitError("--fp8_base needs --mixed_precision bf16 or fp16 (the dtype layers compute in)")
    store_in_float8(unet, compute_dtype, skip=("norm",))
    if config.fp8_base:
        for text_encoder in text_encoders:
            store_in_float8(text_encoder, compute_dtype, skip=("embeddings", "norm"))


def make_network(config: TrainConfig, lora: LoRALayout, unet, text_encoders, vae, train_unet: bool,
                 train_text_encoder: bool) -> tuple[TrainableNetwork, float]:
    """Build the network (or the plug-in's) for the family's `lora` layout, attach it, load --network_weights;
    returns it and its alpha."""
    live_encoders = [t for t in text_encoders if t is not None]
    network = new_network(config, lora, unet, live_encoders, vae, train_unet, train_text_encoder)
    if hasattr(network, "module_counts"):
        logger.info("LoRA modules: %s", network.module_counts())
    network.attach()
    if config.network_weights:
        network.load_file(config.network_weights, unet, lora)
    alphas = {float(module.alpha) for module in getattr(network, "loras", [])}
    network_alpha = alphas.pop() if len(alphas) == 1 else (config.network_alpha or 0.0)
    return network, network_alpha


def new_network(config: TrainConfig, lora: LoRALayout, unet, text_encoders, vae, train_unet: bool,
                train_text_encoder: bool) -> TrainableNetwork:
    """The network --network_module names, with ranks from the flags or --dim_from_weights; neither attached nor
    loaded (the dry run builds it on the meta device)."""
    args = network_args_dict(config)
    if config.dim_from_weights:
        if not config.network_weights:
            raise LorakitError("--dim_from_weights needs --network_weights naming the file to take ranks from")
        state, _ = read_lora(config.network_weights)
        return network_from_file(unet, text_encoders, lora.file_names(state, unet), config.network_weights,
                                 network_args=args, dropout=config.network_dropout, train_unet=train_unet,
                                 train_text_encoder=train_text_encoder, lora=lora)
    module = config.network_module or LORAKIT_MODULE
    network = create_network(module, unet=unet, text_encoders=text_encoders, vae=vae,
                             network_dim=config.network_dim, network_alpha=config.network_alpha,
                             dropout=config.network_dropout, network_args=args, train_unet=train_unet,
                             train_text_encoder=train_text_encoder, lora=lora)
    if served_natively(module):
        return network
    return PluginNetwork(network, text_encoders, unet, train_text_encoder, train_unet)


def network_args_dict(config: TrainConfig) -> dict[str, str] | None:
    if not config.network_args:
        return None
    pairs = {}
    for item in config.network_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise LorakitError(f"--network_args {item!r}: expected key=value")
        pairs[key.strip()] = value.strip()
    return pairs


def make_optimizer(config: TrainConfig, groups: list[dict]) -> BuiltOptimizer:
    """--optimizer_type with --optimizer_args over the network's parameter groups."""
    return build_optimizer(config.optimizer_type, groups, config.learning_rate, config.optimizer_args,
                           lr_scheduler=config.lr_scheduler, max_grad_norm=config.max_grad_norm)


def make_lr_scheduler(config: TrainConfig, built: BuiltOptimizer, max_train_steps: int):
    """The run's LR schedule. The loop steps it once per optimizer step whatever the number of processes
    (accelerate's prepared scheduler, which steps once per process, is not used), so steps are never multiplied."""
    return build_scheduler(
        built.optimizer, built.lr_scheduler or config.lr_scheduler, max_train_steps=max_train_steps,
        num_processes=1, warmup_steps=config.lr_warmup_steps, decay_steps=config.lr_decay_steps,
        num_cycles=config.lr_scheduler_num_cycles, power=config.lr_scheduler_power,
        timescale=config.lr_scheduler_timescale, min_lr_ratio=config.lr_scheduler_min_lr_ratio,
        scheduler_type=config.lr_scheduler_type, scheduler_args=config.lr_scheduler_args,
        schedule_free=built.schedule_free)


def base_weight_multipliers(config: TrainConfig) -> list[float]:
    given = list(config.base_weights_multiplier or ())
    return given + [1.0] * (len(config.base_weights or ()) - len(given))
