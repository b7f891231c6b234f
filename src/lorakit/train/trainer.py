"""Train an SDXL LoRA: `sdxl_train_network.py`'s job, read top to bottom.

What a run supports (each is a flag of `lorakit.config.TrainConfig`):
- data: dataset TOML/JSON or `N_name` folders, buckets, caption processing, flip/colour/crop augmentation,
  regularisation images with `--prior_loss_weight`, masked loss and alpha masks, `--weighted_captions`;
  every image is scanned before any weights load; one DataLoader serves the whole run (its workers live across
  epochs with `--persistent_data_loader_workers`, `lorakit.train.loader`).
- caches: latents (memory or disk, flipped copies with `flip_aug`) and text-encoder outputs; the text encoders and
  the VAE are released afterwards when nothing else needs them.
- network: `networks.lora` (or a plug-in module), `--network_weights`, `--dim_from_weights`, `--base_weights`,
  U-Net / TE1 / TE2 learning rates of their own; `--network_train_unet_only` / `..._text_encoder_only`.
- step: noise offset / multires / input perturbation, timestep range, zero-terminal SNR, ε or v target, l2/l1/
  huber/smooth_l1, min-SNR, debiased estimation, differential output preservation (`lorakit.train.step`).
- optimisation: any `--optimizer_type` and `--lr_scheduler`, gradient accumulation, clipping, max-norm
  regularisation, a real `--fused_backward_pass`.
- precision: `--mixed_precision` through accelerate, with loss scaling under fp16 (`lorakit.train.grad_scaler`,
  saved in states; not with fused backward), `--full_bf16/--full_fp16`, fp8 base weights, gradient
  checkpointing of the U-Net blocks the memory budget needs (`lorakit.train.checkpointing`), SDPA / xformers
  attention, `torch.compile`.
- outputs: sd-scripts' file names, cadence and rotation, metadata, atomic writes; a NaN loss stops the run with the
  batch's image paths and leaves saved files intact; free disk space is checked before each save
  (`lorakit.train.saving`).
- states: `--save_state` writes `lorakit.train.state` folders beside the LoRA files (`--save_state_on_train_end`,
  `--save_last_n_*_state` rotation); `--resume` continues at the exact batch, bit-identical to an uninterrupted run.
  Every random draw of a batch (captions, flips, crops, noise, timesteps) is seeded by its place in the run, so
  neither a resume nor the number of processes changes what is drawn.
- Ctrl-C / SIGTERM: the step in progress is finished, then `{name}-step{N:08d}.safetensors` and its `-state`
  folder are saved (ordinary step-checkpoint names, so rotation and --resume treat them like any other) and the
  resume command printed; exit status 130 (`lorakit.train.interrupt`).
- checks: every input is checked before any weight is read (`lorakit.train.preflight`); `--dry_run` stops there.
- start-up summary (main process): datasets and buckets, steps per epoch and in total, trainable parameters and
  learning rate per optimizer group, dtype and device of each model (or "released" / "on CPU until sampling"),
  the memory estimate part by part and the checkpointing plan.
- logs and looks: sd-scripts' TensorBoard/wandb keys, `{output_name or "last"}_curves.png` (loss and LR curves)
  in the output folder at the end, sample images (`lorakit.train.sampling`) from the live modules, validation loss
  (`lorakit.train.validation`).
- processes: `accelerate launch` / torchrun data parallel (gloo on machines without CUDA); batches are sharded by
  rank, LoRA gradients averaged, weights checked identical across ranks at every save; saves and samples on the
  main process (`lorakit.train.processes`). Runs with different `--mixed_precision` may follow each other in one
  Python process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from lorakit.config import TrainConfig
from lorakit.data.dataset import Sample, TrainBatch, TrainingData, caption_options
from lorakit.data.discovery import load_datasets
from lorakit.data.latent_cache import cache_latents, check_latent_caching_allowed, encode_pixels
from lorakit.data.summary import dataset_summary
from lorakit.data.text_cache import (CaptionEncoder, TextCache, TextItem, cache_text_encoder_outputs, cached_caption,
                                     check_text_caching_allowed)
from lorakit.errors import LorakitError
from lorakit.families import family_named
from lorakit.families.base import ModelFamily
from lorakit.models.components import Components, cast_model
from lorakit.models.loading import load_vae
from lorakit.network.apply import merge_lora
from lorakit.train.checkpointing import CheckpointPlan, apply_plan, checkpoint_units
from lorakit.train.ema import WeightAverage, start_average
from lorakit.train.events import EventsLog
from lorakit.train.fused import fuse_backward
from lorakit.train.grad_scaler import gradient_scaler
from lorakit.train.interrupt import StopRequest
from lorakit.train.loader import RunLoader, batch_generator, data_loader_workers, validation_batches
from lorakit.train.logs import TrainingLog, epoch_logs, step_logs, validation_logs
from lorakit.train.loss import LossOptions
from lorakit.train.memory import Workload
from lorakit.train.metadata import RunFacts, run_metadata
from lorakit.train.noise import NoiseOptions, noise_schedule
from lorakit.train.optimizers import BuiltOptimizer
from lorakit.train.processes import all_reduce_sum, average_gradients, stop_requested
from lorakit.train.preflight import preflight
from lorakit.train.resume import RunProgress, advance_scheduler, read_resumed, restore, run_seed, start_position
from lorakit.train.run_setup import (base_weight_multipliers, compute_dtype, configure_attention, make_accelerator,
                                     make_lr_scheduler, make_network, make_optimizer, network_args_dict,
                                     network_dtype, release_freed_memory, store_base_weights)
from lorakit.train.sample_prompts import SamplePrompt, load_sample_prompts
from lorakit.train.sampling import generate_samples, should_sample
from lorakit.train.saving import Checkpointer
from lorakit.train.step import StepOptions, denoising_loss
from lorakit.train.validation import should_validate, validation_loss, validation_timesteps

logger = logging.getLogger("lorakit")


@dataclass(frozen=True)
class StepPlan:
    """How long the run is (as `train_network.py` counts it): optimizer steps per epoch, total steps, epochs."""

    batches_per_epoch: int  # per process
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int

    @classmethod
    def of(cls, total_batches: int, num_processes: int, gradient_accumulation_steps: int, max_train_steps: int,
           max_train_epochs: int | None) -> StepPlan:
        batches = math.ceil(total_batches / num_processes)
        steps_per_epoch = math.ceil(batches / gradient_accumulation_steps)
        if max_train_epochs:
            max_train_steps = max_train_epochs * steps_per_epoch
        return cls(batches, steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch))


@dataclass
class TrainResult:
    final_file: Path | None
    global_step: int
    losses: list[float]


class NonFiniteLoss(LorakitError):
    """The loss became NaN or infinite; the message names the batch's images and what to try."""


def refuse_start_past_the_end(config: TrainConfig, start_step: int, max_train_steps: int) -> None:
    if start_step >= max_train_steps:
        where = "the resumed state's" if config.initial_step is None and config.initial_epoch is None else (
            "--initial_step/--initial_epoch's")
        raise LorakitError(f"the run would start at {where} step {start_step}, at or past its last step "
                           f"{max_train_steps}: nothing to train (raise --max_train_steps or --max_train_epochs "
                           "to go on)")


def train(config: TrainConfig, events: EventsLog | None = None) -> TrainResult:
    events = events if events is not None else EventsLog(None)  # --events_log, which the caller opened
    # ------------------------------------------------------------------ data: every image scanned before any weights
    family = family_named(config.model_family)
    resumed = read_resumed(config.resume)
    seed = run_seed(config, resumed)
    set_seed(seed)  # python, numpy, torch: the network's initial weights are the same in every process and run
    datasets = load_datasets(dataclasses.asdict(config), bucket_multiple=family.bucket_multiple)
    data = TrainingData(datasets, seed)
    validation_data = TrainingData(datasets, seed, validation=True)
    prompts = load_sample_prompts(config.sample_prompts, config.sample_sampler) if config.sample_prompts else []
    check_data(config, data)
    accelerator = make_accelerator(config)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    plan = StepPlan.of(len(data), world, config.gradient_accumulation_steps, config.max_train_steps,
                       config.max_train_epochs)
    start = start_position(config, plan.steps_per_epoch, resumed, world)
    refuse_start_past_the_end(config, start.global_step, plan.max_train_steps)
    checked = preflight(config, family, prompts, resumed, plan.max_train_steps, accelerator.device, world,
                        Workload.of(data.all_samples(), data.all_samples() + validation_data.all_samples()))
    if main:
        print(dataset_summary(datasets, [data.bucket_counts(i) for i in range(len(datasets))]))
        print(f"batches per epoch {plan.batches_per_epoch} (per process), optimizer steps per epoch "
              f"{plan.steps_per_epoch}, epochs {plan.num_epochs}, total steps {plan.max_train_steps}")
    if config.dry_run:
        print("\n".join(checked.lines + ["all inputs checked: a real run gets past set-up"]))
        return TrainResult(None, 0, [])

    # ------------------------------------------------------------------ models, caches, network, optimizer
    models = load_models(config, family, accelerator.device)
    cache_and_release(models, config, data.all_samples() + validation_data.all_samples(),
                      keep_for_sampling=bool(prompts), progress=main)
    place_unet(models, config)  # after cache_and_release has returned: no frame of it holds a released model
    train_text_encoder = not config.network_train_unet_only and models.text is None
    network, network_alpha = make_network(config, family.lora, models.unet, models.text_encoders, models.vae,
                                          not config.network_train_text_encoder_only,
                                          not config.network_train_unet_only)
    prepare_network(config, network, models, checked.memory.plan if checked.memory is not None else None)
    opt = build_optimization(config, network, plan.max_train_steps, world, accelerator.device)
    ema = WeightAverage.of(config, network)
    if main:
        print(model_summary(opt, models, family) + (f"\n{ema.summary()}" if ema is not None else "")
              + (f"\n{checked.memory.table()}" if checked.memory is not None else ""))

    # ------------------------------------------------------------------ step options, saves, resume
    step_options = step_options_of(config)
    checkpointer = Checkpointer(
        config, network=network, params=opt.params, optimizer=opt.optimizer, lr_scheduler=opt.lr_scheduler,
        scaler=opt.scaler, schedule_free=opt.built.schedule_free, seed=seed, num_epochs=plan.num_epochs,
        max_train_steps=plan.max_train_steps, accelerator=accelerator,
        metadata=metadata_of(config, plan, opt, network_alpha, seed, data, models, world, family), events=events,
        ema=ema)
    if resumed is not None:
        restore(resumed, network, opt.optimizer, opt.lr_scheduler, opt.scaler, rank)
    start_average(ema, resumed, config.resume)
    if resumed is None and start.global_step:
        advance_scheduler(opt.lr_scheduler, start.global_step)
    run = RunProgress.starting(start, resumed, window=plan.batches_per_epoch)
    log = TrainingLog.from_config(config, enabled=main, events=events)
    samples = SampleImages(config, prompts, models, network, checkpointer.names.output_dir, log, accelerator,
                           ema if config.sample_with_ema else None)
    validation = Validation(config, validation_data, models, network, step_options, seed, plan.max_train_steps,
                            log, accelerator)
    loader = RunLoader(data, seed=seed, max_train_steps=plan.max_train_steps, latents=models.latents,
                       text=models.text, masked_loss=config.masked_loss,
                       workers=data_loader_workers(config.max_data_loader_n_workers),
                       persistent=config.persistent_data_loader_workers, rank=rank,
                       world=world, gradient_accumulation_steps=config.gradient_accumulation_steps)

    # ------------------------------------------------------------------ the loop
    gas = config.gradient_accumulation_steps
    bar = tqdm(total=plan.max_train_steps, initial=run.global_step, desc="steps", disable=not main,
               dynamic_ncols=True)
    if main:
        events.write("start", pid=os.getpid(), max_train_steps=plan.max_train_steps, num_epochs=plan.num_epochs,
                     steps_per_epoch=plan.steps_per_epoch, first_step=run.global_step,
                     output_dir=str(checkpointer.names.output_dir.absolute()), output_name=config.output_name)
    samples.maybe("first", run.global_step, start.epoch - 1)
    network.train()
    try:
        with StopRequest() as stop:
            for epoch in range(start.epoch, plan.num_epochs + 1):
                if run.global_step >= plan.max_train_steps:
                    break
                first_batch = start.batches_done if epoch == start.epoch else 0
                if not first_batch:
                    run.epoch_losses = []
                # This process's share of the epoch as indices into the whole epoch's batches, so that each
                # batch's per-item randomness and noise depend on its place in the run, not on the process count.
                indices = loader.share(epoch)
                batches = loader.epoch(epoch, indices[first_batch:], run.global_step - first_batch // gas)
                for batch_index, (global_index, batch) in enumerate(batches, start=first_batch):
                    with accelerator.autocast():
                        loss = batch_loss(batch, models, network, step_options, batch_generator(seed, epoch,
                                          global_index), config, train_text_encoder=train_text_encoder)
                    value = loss.item()  # the one device sync of a batch
                    check_finite(value, batch, run.global_step + 1, epoch)
                    opt.scaler.scale(loss / gas).backward()
                    run.add_batch_loss(value)
                    if (batch_index + 1) % gas and batch_index + 1 < len(indices):
                        continue
                    max_norm = optimizer_step(opt, network, config, world, accelerator.device)
                    run.step_done(epoch, batch_index + 1, value)
                    if ema is not None:
                        ema.update(run.global_step)
                    report_step(bar, log, run, opt, epoch, max_norm)
                    stop_now = stop_requested(stop, world, accelerator.device)
                    checkpointer.after_step(run, stop_now and run.global_step < plan.max_train_steps)
                    samples.maybe("step", run.global_step, epoch)
                    validation.maybe("step", run, epoch)
                    if run.global_step >= plan.max_train_steps:
                        break
                if run.epoch_losses:
                    log.log(epoch_logs(sum(run.epoch_losses) / len(run.epoch_losses)), run.global_step)
                run.epoch_done(epoch, len(indices))
                checkpointer.after_epoch(run, epoch)
                validation.maybe("epoch", run, epoch)
                samples.maybe("epoch", run.global_step, epoch)
            final = checkpointer.at_end(run)
    finally:
        bar.close()
        if main:
            log.write_curves(checkpointer.names.output_dir / f"{config.output_name or 'last'}_curves.png")
        log.close()
    logger.info("training finished: %d steps, final LoRA %s (groups: %s)", run.global_step, final,
                ", ".join(opt.group_names))
    return TrainResult(final if main else None, run.global_step, run.losses)


def check_data(config: TrainConfig, data: TrainingData) -> None:
    if len(data) == 0:
        raise LorakitError("the datasets yield no batches: no training images were found (see the summary above)")
    if config.cache_latents:
        for dataset in data.datasets:
            for subset in dataset.settings.subsets:
                check_latent_caching_allowed(subset.table, subset.color_aug, subset.random_crop)


# ---------------------------------------------------------------------------------------------------- the step


def batch_loss(batch: TrainBatch, models: Models, network, options: StepOptions, generator: torch.Generator,
               config: TrainConfig, *, train_text_encoder: bool) -> torch.Tensor:
    """Latents and text conditioning of a batch, then the diffusion loss (`lorakit.train.step`)."""
    device = models.device
    if batch.latents is not None:
        latents = batch.latents.to(device)
    else:
        latents = encode_latents(models.vae, batch.pixels, config.vae_batch_size, generator).to(device)
    latents = latents.float() * models.family.latent_scale
    if batch.text is not None:
        text = tuple(t.to(device) for t in batch.text)
    elif train_text_encoder:
        text = models.encode_text(batch.captions)
    else:
        with torch.no_grad():
            text = models.encode_text(batch.captions)
    sizes = batch.time_ids.to(device)

    def prediction(noisy, timesteps):
        return models.family.predict(models.unet, noisy, timesteps, text, sizes)

    def base_prediction(noisy, timesteps):
        multiplier = network.multiplier
        network.set_multiplier(0.0)
        try:
            return prediction(noisy, timesteps)
        finally:
            network.set_multiplier(multiplier)

    masks = None if batch.masks is None else batch.masks.to(device)
    return denoising_loss(prediction, latents, options, generator, loss_weights=batch.loss_weights, masks=masks,
                          preserve=batch.preserve, base_prediction=base_prediction)


def check_finite(loss: float, batch: TrainBatch, step: int, epoch: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"loss is {loss} at step {step} (epoch {epoch}); images of the batch: "
            f"{', '.join(str(p) for p in batch.paths)}. Try --no_half_vae, a lower learning rate, "
            f"or bf16 instead of fp16. Files saved so far are intact.")


def optimizer_step(opt: Optimization, network, config: TrainConfig, world: int, device) -> dict | None:
    """One optimizer step once its batches' backward passes are done: gradients averaged across processes,
    unscaled (fp16) and clipped, the optimizer (skipped by the scaler when fp16 gradients overflowed) and the LR
    schedule stepped, then `--scale_weight_norms`. Returns the max-norm statistics for the log (None without
    max-norm)."""
    skipped = False
    if not config.fused_backward_pass:  # fused: every parameter stepped during backward()
        average_gradients(opt.params, world)
        opt.scaler.unscale_(opt.optimizer)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(opt.params, config.max_grad_norm)
        scale = opt.scaler.get_scale()
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.optimizer.zero_grad(set_to_none=True)
        skipped = opt.scaler.get_scale() < scale  # fp16 gradients overflowed: the scaler skipped the step
    if not skipped:  # the schedule follows the steps taken, as accelerate does
        opt.lr_scheduler.step()
    if config.scale_weight_norms:
        return network.apply_max_norm_regularization(config.scale_weight_norms, device)
    return None


def report_step(bar: tqdm, log: TrainingLog, run: RunProgress, opt: Optimization, epoch: int,
                max_norm: dict | None) -> None:
    """The progress bar and the step's log record (`loss/current`, `loss/average`, `lr/<group>`, max-norm)."""
    loss, learning_rates = run.losses[-1], opt.lr_scheduler.get_last_lr()
    bar.update(1)
    bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", avg=f"{run.moving.average:.4f}", lr=f"{learning_rates[0]:.2e}")
    log.log(step_logs(loss, run.moving.average, learning_rates, opt.group_names, opt.optimizer.param_groups,
                      max_norm), run.global_step)


def step_options_of(config: TrainConfig) -> StepOptions:
    return StepOptions(
        schedule=noise_schedule(config.zero_terminal_snr),
        noise=NoiseOptions(config.noise_offset, config.noise_offset_random_strength, config.adaptive_noise_scale,
                           config.multires_noise_iterations, config.multires_noise_discount,
                           config.ip_noise_gamma, config.ip_noise_gamma_random_strength,
                           config.min_timestep or 0, 1000 if config.max_timestep is None else config.max_timestep),
        loss=LossOptions(config.loss_type, config.huber_schedule, config.huber_c, config.huber_scale,
                         config.min_snr_gamma, config.v_parameterization, config.scale_v_pred_loss_like_noise_pred,
                         config.v_pred_like_loss, config.debiased_estimation_loss),
        v_parameterization=config.v_parameterization,
    )


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, vae_batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Pixels → raw latent samples on the fly, `--vae_batch_size` images at a time; NaN latents become 0 with a
    warning (as sd-scripts)."""
    chunks = []
    for start in range(0, pixels.shape[0], max(1, vae_batch_size)):
        chunk = pixels[start:start + max(1, vae_batch_size)]
        seeds = torch.randint(0, 2**62, (chunk.shape[0],), generator=generator).tolist()
        chunks.append(encode_pixels(vae, chunk, seeds).float())
    latents = torch.cat(chunks)
    if not torch.isfinite(latents).all():
        logger.warning("NaN in latents encoded on the fly; replaced by 0 (try --no_half_vae)")
        latents = torch.nan_to_num(latents, nan=0.0, posinf=0.0, neginf=0.0)
    return latents


# ---------------------------------------------------------------------------------------------------- models


@dataclass
class Models:
    """The frozen models of the run and the caches made with them. A cached model's slot is None (released, or
    parked on the CPU in `components` until sampling needs it)."""

    family: ModelFamily
    components: Components  # tokenizers, identities, and every model still held
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: list[torch.nn.Module | None]
    weight_dtype: torch.dtype  # the mixed-precision dtype
    device: torch.device
    encode_text: CaptionEncoder | None = None
    latents: Mapping | None = None
    text: TextCache | None = None


def load_models(config: TrainConfig, family: ModelFamily, device: torch.device) -> Models:
    """The checkpoint's models on the CPU, frozen, in the mixed-precision dtype (the VAE in fp32 with
    --no_half_vae), --base_weights merged, attention configured.

    With both caches the U-Net is not loaded here but by `cache_and_release`, once the VAE and the text encoders
    are gone: the run's peak memory is then about one U-Net, not the whole checkpoint (figures in bench/README.md).
    --base_weights may touch every model, so they keep the single load."""
    weight_dtype = compute_dtype(config)
    vae_source = config.vae or config.pretrained_model_name_or_path
    # The VAE's own weights in fp32, not a copy already rounded to the mixed dtype while loading.
    fp32_vae = config.no_half_vae and weight_dtype != torch.float32 and os.path.exists(vae_source)
    skip = {"vae"} if fp32_vae else set()
    if unet_after_caching(config):
        skip.add("unet")
    components = family.load(config.pretrained_model_name_or_path, vae=config.vae, dtype=weight_dtype,
                             device="cpu", tokenizer_cache_dir=config.tokenizer_cache_dir, skip=skip)
    if fp32_vae:
        components.vae = load_vae(vae_source, torch.float32,
                                  part=next(part for part in family.layout.parts() if part.attribute == "vae"))
    vae = cast_model(components.vae, torch.float32 if config.no_half_vae else weight_dtype)
    models = Models(family, components, components.unet, vae, components.text_encoders, weight_dtype, device)
    for model in (models.vae, *models.text_encoders):
        model.requires_grad_(False)
    configure_attention(config, models.vae)
    if models.unet is not None:
        prepare_unet(config, models.unet)
    for path, multiplier in zip(config.base_weights or (), base_weight_multipliers(config)):
        merge_lora(components, path, multiplier, family.lora)
    return models


def unet_after_caching(config: TrainConfig) -> bool:
    return config.cache_latents and config.cache_text_encoder_outputs and not config.base_weights


def prepare_unet(config: TrainConfig, unet: torch.nn.Module) -> None:
    unet.requires_grad_(False)
    configure_attention(config, unet)


def cache_and_release(models: Models, config: TrainConfig, samples: list[Sample], *, keep_for_sampling: bool,
                      progress: bool) -> None:
    """Cache latents and text-encoder outputs as asked, then release the VAE and text encoders (or park them on
    the CPU when sample images need them)."""
    components, device = models.components, models.device
    models.vae.to(device)
    if config.cache_latents:
        models.latents = cache_latents(
            [s.latent_item() for s in samples], models.vae,
            vae_identity=(components.vae_identity or components.identity).name, batch_size=config.vae_batch_size,
            to_disk=config.cache_latents_to_disk, progress=progress, skip_check=config.skip_cache_check)
    for text_encoder in models.text_encoders:
        text_encoder.to(device)
    models.encode_text = models.family.caption_encoder(components, max_token_length=config.max_token_length,
                                                       weighted=config.weighted_captions, clip_skip=config.clip_skip)
    if config.cache_text_encoder_outputs:
        models.text = cache_text(samples, components, models.encode_text, config, progress)
    if models.latents is not None:
        if keep_for_sampling:
            models.vae.to("cpu")
        else:
            models.vae = None
            components.release("vae")
    if models.text is not None:
        models.text_encoders = [None] * len(models.text_encoders)
        models.encode_text = None  # it holds the encoders too
        if keep_for_sampling:
            for text_encoder in components.text_encoders:
                text_encoder.to("cpu")
        else:
            components.release(*components.TEXT_ENCODERS)


def place_unet(models: Models, config: TrainConfig) -> None:
    """Load the U-Net when `load_models` left it for after caching, then put it on the device (in fp8 with
    --fp8_base)."""
    gc.collect()
    release_freed_memory()
    if models.unet is None:
        models.components.unet = models.unet = models.family.load(
            config.pretrained_model_name_or_path, dtype=models.weight_dtype,
            skip={"vae", *models.components.TEXT_ENCODERS}).unet
        prepare_unet(config, models.unet)
    models.unet.to(models.device)
    store_base_weights(config, models.unet, [t for t in models.text_encoders if t is not None], models.weight_dtype)


def cache_text(samples: list[Sample], components, encoder: CaptionEncoder, config: TrainConfig,
               progress: bool) -> TextCache:
    """--cache_text_encoder_outputs[_to_disk]: the text conditioning of every processed caption, encoded once;
    caption options that would change the caption between draws are refused."""
    items = []
    for sample in samples:
        record = sample.record
        options = caption_options(record)
        check_text_caching_allowed(record.subset.table, options, {record.path: record.caption})
        items.append(TextItem(record.path, cached_caption(record.caption, options)))
    return cache_text_encoder_outputs(
        items, encoder.tokenizers, encoder.encoders, encoders_identity=components.identity.name,
        max_token_length=encoder.max_token_length, weighted=encoder.weighted, clip_skip=encoder.clip_skip,
        batch_size=max(s.batch_size for s in samples), progress=progress,
        to_disk=config.cache_text_encoder_outputs_to_disk, skip_check=config.skip_cache_check)


def prepare_network(config: TrainConfig, network, models: Models, plan: CheckpointPlan | None) -> None:
    """The network's dtype and device; gradient checkpointing of the plan's U-Net units (every unit for a model
    the dry run could not see); torch.compile."""
    network.to(models.device, dtype=network_dtype(config))
    if config.gradient_checkpointing:
        apply_plan(models.unet, plan.checkpointed if plan is not None else
                   tuple(name for name, _ in checkpoint_units(models.unet)))
        models.unet.train()  # as sd-scripts does; the U-Net has no dropout, so its outputs are unchanged
        for text_encoder in models.text_encoders:
            if text_encoder is not None and not config.network_train_unet_only:
                text_encoder.gradient_checkpointing_enable()
                text_encoder.train()  # transformers checkpoints layers only in training mode
    if config.torch_compile:
        models.unet.compile(backend=config.dynamo_backend)


# ---------------------------------------------------------------------------------------------------- optimizer


@dataclass
class Optimization:
    """The optimizer over the network's groups, its LR schedule and the gradient scaler (disabled unless fp16)."""

    built: BuiltOptimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    params: list[torch.Tensor]
    group_names: list[str]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.built.optimizer


def build_optimization(config: TrainConfig, network, max_train_steps: int, world: int,
                       device: torch.device) -> Optimization:
    scaler = gradient_scaler(config.mixed_precision, full_fp16=config.full_fp16,
                             fused_backward_pass=config.fused_backward_pass, device_type=device.type)
    groups = network.parameter_groups(config.unet_lr, config.text_encoder_lr1, config.text_encoder_lr2,
                                      config.learning_rate)
    built = make_optimizer(config, groups)
    for warning in built.warnings:
        logger.warning(warning)
    lr_scheduler = make_lr_scheduler(config, built, max_train_steps)
    if config.fused_backward_pass:  # each parameter steps in its gradient hook; the loop only steps the schedule
        fuse_backward(built.optimizer, built.make, gradient_accumulation_steps=config.gradient_accumulation_steps,
                      max_grad_norm=config.max_grad_norm, num_processes=world)
    return Optimization(built, lr_scheduler, scaler, [p for group in groups for p in group["params"]],
                        [group.get("name", f"group{i}") for i, group in enumerate(groups)])


def metadata_of(config: TrainConfig, plan: StepPlan, opt: Optimization, network_alpha: float, seed: int,
                data: TrainingData, models: Models, world: int, family: ModelFamily) -> dict[str, str]:
    """The `ss_*` metadata every saved file of the run shares (`lorakit.train.metadata`)."""
    facts = RunFacts(
        session_id=random.randrange(2**32), started_at=time.time(), num_batches_per_epoch=plan.batches_per_epoch,
        num_epochs=plan.num_epochs, max_train_steps=plan.max_train_steps, optimizer=opt.built.description,
        learning_rate=opt.built.lr, lr_scheduler=opt.built.lr_scheduler or config.lr_scheduler,
        network_args=network_args_dict(config), network_alpha=network_alpha, seed=seed,
        total_batch_size=data.datasets[0].settings.batch_size * world * config.gradient_accumulation_steps)
    return run_metadata(config, facts, data, models.components.identity, models.components.vae_identity, family)


def model_summary(opt: Optimization, models: Models, family: ModelFamily) -> str:
    """The start-up block: trainable parameters and learning rate per optimizer group, and where each model
    lives."""
    lines = ["trainable parameters:"]
    for name, group in zip(opt.group_names, opt.optimizer.param_groups):
        lr = group.get("initial_lr", group.get("lr"))
        count = sum(p.numel() for p in group["params"])
        lines.append(f"  {name:<16} {count:>12,}  lr {'auto' if lr is None else f'{lr:.2e}'}")
    lines.append(f"  {'total':<16} {sum(p.numel() for p in opt.params):>12,}")
    components = models.components
    held = {"U-Net": (models.unet, models.unet), "VAE": (models.vae, components.vae)}
    held |= {label: pair for label, pair in zip(family.text_encoder_labels,
                                                 zip(models.text_encoders, components.text_encoders))}
    places = [f"{name} {_placement(live, parked, models.weight_dtype)}" for name, (live, parked) in held.items()]
    return "\n".join(lines + ["models: " + "; ".join(places)])


def _placement(live: torch.nn.Module | None, parked: torch.nn.Module | None, compute_dtype: torch.dtype) -> str:
    if live is None:
        return "on CPU until sampling" if parked is not None else "released"
    param = next(live.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    if param.dtype.itemsize == 1:
        dtype += f" (computes in {str(compute_dtype).removeprefix('torch.')})"
    return f"{dtype} on {param.device}"


# ---------------------------------------------------------------------------------------------------- looks


class SampleImages:
    """Sample images from the live modules at the points `--sample_*` name (main process); text encoders parked
    on the CPU visit the device meanwhile."""

    def __init__(self, config: TrainConfig, prompts: list[SamplePrompt], models: Models, network,
                 output_dir: Path, log: TrainingLog, accelerator: Accelerator,
                 ema: WeightAverage | None = None) -> None:
        self.config, self.prompts, self.models, self.network = config, prompts, models, network
        self.output_dir, self.log, self.accelerator, self.ema = output_dir, log, accelerator, ema

    def maybe(self, when: str, step: int, epoch: int) -> None:
        """`when` is "first" (before training; `epoch` is the one before the first), "step" or "epoch"."""
        config = self.config
        if self.prompts and should_sample(when, global_step=step, epoch=epoch, at_first=config.sample_at_first,
                                          every_n_steps=config.sample_every_n_steps,
                                          every_n_epochs=config.sample_every_n_epochs):
            self.sample(step, epoch if when == "epoch" else None)

    def sample(self, step: int, epoch: int | None) -> None:
        if self.accelerator.is_main_process:
            components, device = self.models.components, self.models.device
            encoders = components.text_encoders
            parked = [e for e in encoders if next(e.parameters()).device != torch.device(device)]
            for encoder in parked:
                encoder.to(device)
            weights = self.ema.in_place() if self.ema is not None else contextlib.nullcontext()
            try:
                with weights:
                    result = generate_samples(
                        self.models.family, components, self.models.unet, encoders, self.prompts, self.output_dir,
                        self.config.output_name, step, epoch, v_parameterization=self.config.v_parameterization,
                        device=device, dtype=self.models.weight_dtype, network=self.network,
                        clip_skip=self.config.clip_skip)
            finally:
                for encoder in parked:
                    encoder.to("cpu")
            self.log.log_images(result.images, step)
        self.accelerator.wait_for_everyone()


class Validation:
    """Validation loss over the held-out batches (`lorakit.train.validation`), summed over processes, logged
    under sd-scripts' keys."""

    def __init__(self, config: TrainConfig, data: TrainingData, models: Models, network, options: StepOptions,
                 seed: int, max_train_steps: int, log: TrainingLog, accelerator: Accelerator) -> None:
        self.config, self.models, self.network, self.options = config, models, network, options
        self.log, self.accelerator = log, accelerator
        self.held_out = data.images() > 0
        self.seed = config.validation_seed if config.validation_seed is not None else seed
        self.batches = validation_batches(data, seed=seed, max_train_steps=max_train_steps, latents=models.latents,
                                          text=models.text, masked_loss=config.masked_loss,
                                          rank=accelerator.process_index, world=accelerator.num_processes)
        self.timesteps = validation_timesteps(options.noise.min_timestep, options.noise.max_timestep)

    def maybe(self, when: str, run: RunProgress, epoch: int) -> None:
        if self.held_out and should_validate(when, global_step=run.global_step, epoch=epoch,
                           every_n_steps=self.config.validate_every_n_steps if when == "step" else None,
                           every_n_epochs=self.config.validate_every_n_epochs if when == "epoch" else None):
            self.log.log(validation_logs(when, self.loss(), run.moving.average), run.global_step)

    def loss(self) -> float:
        def loss_of(batch: TrainBatch, options: StepOptions, generator: torch.Generator) -> torch.Tensor:
            with self.accelerator.autocast():
                return batch_loss(batch, self.models, self.network, options, generator, self.config,
                                  train_text_encoder=False)

        total, count = validation_loss((self.batches[i] for i in range(len(self.batches))), loss_of, self.options,
                                       self.timesteps, self.seed, self.network, self.config.max_validation_steps)
        if self.accelerator.num_processes > 1:
            total, count = all_reduce_sum([total, count], self.models.device)
        return total / max(count, 1)
