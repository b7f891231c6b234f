"""Train an SDXL LoRA: `sdxl_train_network.py`'s job, read top to bottom.

What a run supports (each is a flag of `lorakit.config.TrainConfig`):
- data: dataset TOML/JSON or `N_name` folders, buckets, caption processing, flip/colour/crop augmentation,
  regularisation images with `--prior_loss_weight`, masked loss and alpha masks, `--weighted_captions`;
  every image is scanned before any weights load.
- caches: latents (memory or disk, flipped copies with `flip_aug`) and text-encoder outputs; the text encoders and
  the VAE are released afterwards when nothing else needs them.
- network: `networks.lora` (or a plug-in module), `--network_weights`, `--dim_from_weights`, `--base_weights`,
  U-Net / TE1 / TE2 learning rates of their own; `--network_train_unet_only` / `..._text_encoder_only`.
- step: noise offset / multires / input perturbation, timestep range, zero-terminal SNR, ε or v target, l2/l1/
  huber/smooth_l1, min-SNR, debiased estimation, differential output preservation (`lorakit.train.step`).
- optimisation: any `--optimizer_type` and `--lr_scheduler`, gradient accumulation, clipping, max-norm
  regularisation, a real `--fused_backward_pass`.
- precision: `--mixed_precision` through accelerate, `--full_bf16/--full_fp16`, fp8 base weights, gradient
  checkpointing, SDPA / xformers attention, `torch.compile`.
- outputs: sd-scripts' file names, cadence and rotation, metadata, atomic writes; a NaN loss stops the run with the
  batch's image paths and leaves saved files intact; free disk space is checked before each save.
- states: `--save_state` writes `lorakit.train.state` folders beside the LoRA files (`--save_state_on_train_end`,
  `--save_last_n_*_state` rotation); `--resume` continues at the exact batch, bit-identical to an uninterrupted run.
  Every random draw of a batch (captions, flips, crops, noise, timesteps) is seeded by its place in the run, so
  neither a resume nor the number of processes changes what is drawn.
- Ctrl-C / SIGTERM: the step in progress is finished, then `{name}-step{N:08d}.safetensors` and its `-state`
  folder are saved (ordinary step-checkpoint names, so rotation and --resume treat them like any other) and the
  resume command printed; exit status 130 (`lorakit.train.interrupt`).
- logs and looks: the reference's TensorBoard/wandb keys, `{output_name or "last"}_curves.png` (loss and LR curves)
  in the output folder at the end, sample images (`lorakit.train.sampling`) from the live modules, validation loss
  (`lorakit.train.validation`).
- processes: `accelerate launch` / torchrun data parallel (gloo on machines without CUDA); batches are sharded by
  rank, LoRA gradients averaged, weights checked identical across ranks at every save; saves and samples on the
  main process.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from lorakit.config import TrainConfig
from lorakit.data.dataset import BatchLoader, Sample, TrainBatch, TrainingData, caption_options
from lorakit.data.discovery import load_datasets
from lorakit.data.latent_cache import cache_latents, check_latent_caching_allowed, encode_pixels
from lorakit.data.summary import dataset_summary
from lorakit.data.text_cache import (TextCache, TextItem, cache_text_encoder_outputs, cached_caption,
                                     check_text_caching_allowed)
from lorakit.errors import LorakitError
from lorakit.models import load_sdxl
from lorakit.models.loading import load_vae
from lorakit.models.vae import LATENT_SCALE
from lorakit.network.apply import merge_lora, network_from_file, to_sgm_names
from lorakit.network.io import load_network_weights, read_lora, save_network
from lorakit.network.network import LoRANetwork
from lorakit.network.plugins import LORAKIT_MODULE, create_network
from lorakit.train.fused import fuse_backward
from lorakit.train.interrupt import StopRequest, TrainingInterrupted, resume_command
from lorakit.train.logs import MovingAverage, TrainingLog, epoch_logs, step_logs, validation_logs
from lorakit.train.loss import LossOptions
from lorakit.train.metadata import RunFacts, run_metadata, save_metadata
from lorakit.train.noise import NoiseOptions, noise_schedule
from lorakit.train.optimizers import build_optimizer, optimizer_eval_mode, optimizer_train_mode
from lorakit.train.outputs import (OutputNames, last_epoch_to_remove, last_step_to_remove, prune,
                                   save_every_n_epochs_from_ratio, should_save_epoch, should_save_step)
from lorakit.train.sample_prompts import load_sample_prompts
from lorakit.train.sampling import generate_samples, should_sample
from lorakit.train.schedulers import build_scheduler
from lorakit.train.state import (TrainState, check_free_space, gather_strings, read_state, rng_json, set_rng_state,
                                 state_bytes, write_state)
from lorakit.train.step import StepOptions, TextEncoding, diffusion_loss, predict
from lorakit.train.validation import should_validate, validation_loss, validation_timesteps

logger = logging.getLogger("lorakit")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class StepPlan:
    """How long the run is (reference §3.8): optimizer steps per epoch, total steps, epochs."""

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
    pass


def train(config: TrainConfig) -> TrainResult:
    # ------------------------------------------------------------------ data: every image scanned before any weights
    resumed = read_state(config.resume) if config.resume else None
    seed = run_seed(config, resumed)
    set_seed(seed)  # python, numpy, torch: the network's initial weights are the same in every process and run
    datasets = load_datasets(dataclasses.asdict(config))
    data = TrainingData(datasets, seed)
    validation_data = TrainingData(datasets, seed, validation=True)
    prompts = load_sample_prompts(config.sample_prompts, config.sample_sampler) if config.sample_prompts else []
    if len(data) == 0:
        raise LorakitError("the datasets yield no batches: no training images were found (see the summary above)")
    if config.cache_latents:
        for dataset in datasets:
            for subset in dataset.settings.subsets:
                check_latent_caching_allowed(subset.table, subset.color_aug, subset.random_crop)
    accelerator = make_accelerator(config)
    plan = StepPlan.of(len(data), accelerator.num_processes, config.gradient_accumulation_steps,
                       config.max_train_steps, config.max_train_epochs)
    if accelerator.is_main_process:
        print(dataset_summary(datasets, [data.bucket_counts(i) for i in range(len(datasets))]))
        print(f"batches per epoch {plan.batches_per_epoch} (per process), optimizer steps per epoch "
              f"{plan.steps_per_epoch}, epochs {plan.num_epochs}, total steps {plan.max_train_steps}")
    if config.dry_run:
        print(memory_estimate(config))
        return TrainResult(None, 0, [])

    # ------------------------------------------------------------------ models
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    vae_dtype = torch.float32 if config.no_half_vae else weight_dtype
    components = load_sdxl(config.pretrained_model_name_or_path, vae=config.vae, dtype=weight_dtype, device="cpu",
                           tokenizer_cache_dir=config.tokenizer_cache_dir)
    vae_source = config.vae or config.pretrained_model_name_or_path
    if config.no_half_vae and weight_dtype != torch.float32 and os.path.exists(vae_source):
        # The VAE's own weights in fp32, not the copy already rounded to the mixed dtype while loading.
        components.vae = load_vae(vae_source, torch.float32)
    unet, vae = components.unet, components.vae.to(vae_dtype)
    text_encoders = [components.text_encoder1, components.text_encoder2]
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    for path, multiplier in zip(config.base_weights or (), _multipliers(config)):
        merge_lora(components, path, multiplier)
    configure_attention(config, unet, vae)

    # ------------------------------------------------------------------ caches
    vae.to(device)
    latents = None
    if config.cache_latents:
        latents = cache_latents([s.latent_item() for s in data.all_samples() + validation_data.all_samples()], vae,
                                vae_identity=(components.vae_identity or components.identity).name,
                                batch_size=config.vae_batch_size, to_disk=config.cache_latents_to_disk,
                                progress=accelerator.is_main_process, skip_check=config.skip_cache_check)
    train_text_encoder = not config.network_train_unet_only
    train_unet = not config.network_train_text_encoder_only
    for text_encoder in text_encoders:
        text_encoder.to(device)
    encode_text = TextEncoding(components.tokenizer1, components.tokenizer2, *text_encoders,
                               max_token_length=config.max_token_length, weighted_captions=config.weighted_captions)
    cached_text = None
    if config.cache_text_encoder_outputs:
        cached_text = cache_text(data.all_samples() + validation_data.all_samples(), components, text_encoders,
                                 config, accelerator.is_main_process)
    # Once cached, the VAE and the text encoders are released, or parked on the CPU when sample images need them.
    if latents is not None:
        if prompts:
            vae.to("cpu")
        else:
            vae = components.vae = None
    if cached_text is not None:
        text_encoders = [None, None]
        if prompts:
            components.text_encoder1.to("cpu")
            components.text_encoder2.to("cpu")
        else:
            components.text_encoder1 = components.text_encoder2 = None
    gc.collect()
    unet.to(device)
    store_base_weights(config, unet, [t for t in text_encoders if t is not None], weight_dtype)

    # ------------------------------------------------------------------ network
    network, network_alpha = make_network(config, components, unet, text_encoders, vae, train_unet,
                                          train_text_encoder)
    network.to(device, dtype=torch.bfloat16 if config.full_bf16 else torch.float16 if config.full_fp16 else
               torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode; dropout-free, so outputs are unchanged
        for text_encoder in text_encoders:
            if text_encoder is not None and train_text_encoder:
                text_encoder.gradient_checkpointing_enable()
                text_encoder.train()
    if config.torch_compile:
        unet.compile(backend=config.dynamo_backend)

    # ------------------------------------------------------------------ optimizer and schedule
    groups = network.parameter_groups(config.unet_lr, config.text_encoder_lr1, config.text_encoder_lr2,
                                      config.learning_rate) if isinstance(network, LoRANetwork) else \
        _plugin_groups(network, config)
    params = [p for group in groups for p in group["params"]]
    built = build_optimizer(config.optimizer_type, groups, config.learning_rate, config.optimizer_args,
                            lr_scheduler=config.lr_scheduler, max_grad_norm=config.max_grad_norm)
    for warning in built.warnings:
        logger.warning(warning)
    optimizer = built.optimizer
    lr_scheduler = build_scheduler(
        # The loop steps the schedule once per optimizer step whatever the number of processes (accelerate's
        # prepared scheduler, which steps once per process, is not used), so steps are never multiplied.
        optimizer, built.lr_scheduler or config.lr_scheduler, max_train_steps=plan.max_train_steps,
        num_processes=1, warmup_steps=config.lr_warmup_steps,
        decay_steps=config.lr_decay_steps, num_cycles=config.lr_scheduler_num_cycles,
        power=config.lr_scheduler_power, timescale=config.lr_scheduler_timescale,
        min_lr_ratio=config.lr_scheduler_min_lr_ratio, scheduler_type=config.lr_scheduler_type,
        scheduler_args=config.lr_scheduler_args, schedule_free=built.schedule_free)
    group_names = [group.get("name", f"group{i}") for i, group in enumerate(groups)]
    if config.fused_backward_pass:  # each parameter steps in its gradient hook; the loop only steps the schedule
        fuse_backward(optimizer, built.make, gradient_accumulation_steps=config.gradient_accumulation_steps,
                      max_grad_norm=config.max_grad_norm, num_processes=accelerator.num_processes)

    # ------------------------------------------------------------------ step options, outputs, metadata
    step_options = StepOptions(
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
    names = OutputNames(Path(config.output_dir or "."), config.output_name, config.save_model_as)
    save_every_n_epochs = config.save_every_n_epochs
    if config.save_n_epoch_ratio:
        save_every_n_epochs = save_every_n_epochs_from_ratio(plan.num_epochs, config.save_n_epoch_ratio)
    facts = RunFacts(
        session_id=random.randrange(2**32), started_at=time.time(), num_batches_per_epoch=plan.batches_per_epoch,
        num_epochs=plan.num_epochs, max_train_steps=plan.max_train_steps, optimizer=built.description,
        learning_rate=built.lr, lr_scheduler=built.lr_scheduler or config.lr_scheduler,
        network_args=_network_args_dict(config), network_alpha=network_alpha, seed=seed,
        total_batch_size=datasets[0].settings.batch_size * accelerator.num_processes
        * config.gradient_accumulation_steps)
    shared_metadata = run_metadata(config, facts, data, components.identity, components.vae_identity)
    save_dtype = DTYPES.get(config.save_precision) if config.save_precision else None

    rank, world = accelerator.process_index, accelerator.num_processes
    gas = config.gradient_accumulation_steps
    if resumed is not None:
        restore(resumed, network, optimizer, lr_scheduler, rank)
    start = start_position(config, plan, resumed, world)
    if resumed is None and start.global_step:
        advance_scheduler(lr_scheduler, start.global_step)
    log = TrainingLog.from_config(config, enabled=accelerator.is_main_process)
    moving = MovingAverage(plan.batches_per_epoch)
    epoch_losses: list[float] = []
    if resumed is not None and start.global_step == resumed.global_step:
        moving.load_state_dict(resumed.progress["moving_average"])
        epoch_losses = list(resumed.progress["epoch_losses"]) if start.batches_done else []
    global_step, losses = start.global_step, []
    position = (start.epoch, start.batches_done, False)  # (epoch, batches done in it, epoch-end work done)

    def progress_of(epoch: int, batches_done: int, epoch_finished: bool) -> dict:
        return {"global_step": global_step, "epoch": epoch, "batches_done": batches_done,
                "epoch_finished": epoch_finished, "seed": seed, "num_processes": world,
                "max_train_steps": plan.max_train_steps, "moving_average": moving.state_dict(),
                "epoch_losses": [] if epoch_finished else list(epoch_losses)}

    def save(path: Path, epoch: int, step: int, progress: dict | None = None) -> Path | None:
        """The LoRA file (main process) and, given the loop's `progress`, its state folder (with every rank's
        RNG states). Every process calls it."""
        rng = gather_strings(rng_json(), _all_gather if world > 1 else None) if progress is not None else None
        if world > 1:
            check_in_sync(params, accelerator.is_main_process)
        state_dir = names.state_dir(path) if progress is not None else None
        if accelerator.is_main_process:
            needed = lora_bytes(network, save_dtype) + (state_bytes(network, optimizer) if progress else 0)
            check_free_space(path.parent, needed, path.name + (" and its state" if progress else ""))
            if built.schedule_free:
                optimizer_eval_mode(optimizer)
            metadata = save_metadata(shared_metadata, steps=step, epoch=epoch, no_metadata=config.no_metadata)
            save_network_file(network, path, save_dtype, metadata)
            if built.schedule_free:
                optimizer_train_mode(optimizer)
            logger.info("saved %s", path)
            if state_dir is not None:
                write_state(state_dir, network=network, optimizer=optimizer, lr_scheduler=lr_scheduler, rng=rng,
                            progress=progress)
                logger.info("saved state %s", state_dir)
        accelerator.wait_for_everyone()
        return state_dir

    def sample(step: int, epoch: int | None) -> None:
        """Sample images from the live modules (main process); parked text encoders visit the device."""
        if accelerator.is_main_process:
            encoders = [components.text_encoder1, components.text_encoder2]
            parked = [e for e in encoders if next(e.parameters()).device != torch.device(device)]
            for encoder in parked:
                encoder.to(device)
            try:
                result = generate_samples(unet, components.vae, *encoders, components.tokenizer1,
                                          components.tokenizer2, prompts, names.output_dir, config.output_name, step,
                                          epoch, v_parameterization=config.v_parameterization, device=device,
                                          dtype=weight_dtype, network=network)
            finally:
                for encoder in parked:
                    encoder.to("cpu")
            log.log_images(result.images, step)
        accelerator.wait_for_everyone()

    validation_batches = None
    if validation_data.images():
        validation_batches = BatchLoader(
            shard(validation_data.epoch_batches(1), rank, world), seed=seed, epoch=1, step_of_batch=lambda i: 0,
            max_train_steps=plan.max_train_steps, latents=latents, text=cached_text, masked_loss=config.masked_loss)
    timesteps = validation_timesteps(step_options.noise.min_timestep, step_options.noise.max_timestep)

    def validate(kind: str) -> None:
        def loss_of(batch: TrainBatch, options: StepOptions, generator: torch.Generator) -> torch.Tensor:
            with accelerator.autocast():
                return batch_loss(batch, unet=unet, vae=vae, network=network, encode_text=encode_text,
                                  train_text_encoder=False, options=options, generator=generator, config=config,
                                  device=device)

        total, count = validation_loss(
            (validation_batches[i] for i in range(len(validation_batches))), loss_of, step_options, timesteps,
            config.validation_seed if config.validation_seed is not None else seed, network,
            config.max_validation_steps)
        if world > 1:
            sums = torch.tensor([total, count], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(sums)
            total, count = sums.tolist()
        log.log(validation_logs(kind, total / max(count, 1), moving.average), global_step)

    def rotate(kind: str) -> None:
        if kind == "step":
            every, files = config.save_every_n_steps, names.step_files()
            last, last_state = (last_step_to_remove(global_step, every, n)
                                for n in (config.save_last_n_steps, config.save_last_n_steps_state))
        else:
            every, files = save_every_n_epochs, names.epoch_files()
            last, last_state = (last_epoch_to_remove(position[0], every, n)
                                for n in (config.save_last_n_epochs, config.save_last_n_epochs_state))
        if not accelerator.is_main_process:
            return
        prune(files, last, names, with_states=config.save_last_n_steps_state is None if kind == "step" else
              config.save_last_n_epochs_state is None)
        for number, folder in existing_states(names, kind).items():
            if last_state is not None and number <= last_state:
                shutil.rmtree(folder, ignore_errors=True)

    def interrupted(path: Path, state_dir: Path) -> TrainingInterrupted:
        command = resume_command(sys.argv, state_dir)
        message = (f"interrupted after step {global_step}: saved {path} and {state_dir}\n"
                   f"resume with:\n  {command}")
        if accelerator.is_main_process:
            print(message, flush=True)
        return TrainingInterrupted(message)

    # ------------------------------------------------------------------ the loop
    progress = tqdm(total=plan.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    if prompts and should_sample("first", global_step=global_step, epoch=start.epoch - 1,
                                 at_first=config.sample_at_first, every_n_steps=config.sample_every_n_steps,
                                 every_n_epochs=config.sample_every_n_epochs):
        sample(global_step, None)
    network.train()
    try:
        with StopRequest() as stop:
            for epoch in range(start.epoch, plan.num_epochs + 1):
                if global_step >= plan.max_train_steps:
                    break
                first_batch = start.batches_done if epoch == start.epoch else 0
                if not first_batch:
                    epoch_losses = []
                # This process's share of the epoch as indices into the whole epoch's batches, so that each
                # batch's per-item randomness and noise depend on its place in the run, not on the process count.
                epoch_batches = data.epoch_batches(epoch)
                batches = shard(list(range(len(epoch_batches))), rank, world)
                steps_at_epoch_start = global_step - first_batch // gas
                loader = torch.utils.data.DataLoader(
                    BatchLoader(epoch_batches, seed=seed, epoch=epoch, max_train_steps=plan.max_train_steps,
                                step_of_batch=lambda i: steps_at_epoch_start + i // world // gas, latents=latents,
                                text=cached_text, masked_loss=config.masked_loss),
                    sampler=batches[first_batch:], batch_size=None, num_workers=data_loader_workers(config),
                    persistent_workers=False)
                for batch_index, (global_index, batch) in enumerate(zip(batches[first_batch:], loader),
                                                                    start=first_batch):
                    generator = batch_generator(seed, epoch, global_index)
                    with accelerator.autocast():
                        loss = batch_loss(batch, unet=unet, vae=vae, network=network, encode_text=encode_text,
                                          train_text_encoder=train_text_encoder and cached_text is None,
                                          options=step_options, generator=generator, config=config, device=device)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(
                            f"loss is {loss.item()} at step {global_step + 1} (epoch {epoch}); images of the batch: "
                            f"{', '.join(str(p) for p in batch.paths)}. Try --no_half_vae, a lower learning rate, "
                            f"or bf16 instead of fp16. Files saved so far are intact.")
                    (loss / gas).backward()
                    epoch_losses.append(loss.item())
                    moving.add(loss.item())
                    if (batch_index + 1) % gas and batch_index + 1 < len(batches):
                        continue
                    if not config.fused_backward_pass:  # fused: every parameter stepped during backward()
                        average_gradients(params, accelerator)
                        if config.max_grad_norm:
                            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    lr_scheduler.step()
                    max_norm = None
                    if config.scale_weight_norms and isinstance(network, LoRANetwork):
                        max_norm = network.apply_max_norm_regularization(config.scale_weight_norms, device)
                    global_step += 1
                    position = (epoch, batch_index + 1, False)
                    losses.append(loss.item())
                    progress.update(1)
                    progress.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", avg=f"{moving.average:.4f}",
                                         lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                    log.log(step_logs(loss.item(), moving.average, lr_scheduler.get_last_lr(), group_names,
                                      optimizer.param_groups, max_norm), global_step)
                    stop_now = stop_requested(stop, world, device) and global_step < plan.max_train_steps
                    step_save = (should_save_step(global_step, config.save_every_n_steps)
                                 and global_step < plan.max_train_steps)
                    if step_save or stop_now:
                        path = names.step_file(global_step)
                        state_dir = save(path, epoch - 1, global_step,
                                         progress_of(*position) if config.save_state or stop_now else None)
                        if step_save:
                            rotate("step")
                        if stop_now:
                            raise interrupted(path, state_dir)
                    if prompts and should_sample("step", global_step=global_step, epoch=epoch,
                                                 at_first=config.sample_at_first,
                                                 every_n_steps=config.sample_every_n_steps,
                                                 every_n_epochs=config.sample_every_n_epochs):
                        sample(global_step, None)
                    if validation_batches is not None and should_validate(
                            "step", global_step=global_step, epoch=epoch,
                            every_n_steps=config.validate_every_n_steps, every_n_epochs=None):
                        validate("step")
                    if global_step >= plan.max_train_steps:
                        break
                if epoch_losses:
                    log.log(epoch_logs(sum(epoch_losses) / len(epoch_losses)), global_step)
                # Finished, unless --max_train_steps ended it early (then a resumed longer run goes on from there).
                position = (epoch, position[1], position[:2] == (epoch, len(batches)))
                if should_save_epoch(epoch, plan.num_epochs, save_every_n_epochs):
                    save(names.epoch_file(epoch), epoch, global_step,
                         progress_of(*position) if config.save_state else None)
                    rotate("epoch")
                if validation_batches is not None and should_validate(
                        "epoch", global_step=global_step, epoch=epoch, every_n_steps=None,
                        every_n_epochs=config.validate_every_n_epochs):
                    validate("epoch")
                if prompts and should_sample("epoch", global_step=global_step, epoch=epoch,
                                             at_first=config.sample_at_first,
                                             every_n_steps=config.sample_every_n_steps,
                                             every_n_epochs=config.sample_every_n_epochs):
                    sample(global_step, epoch)
            final = names.final_file()
            save(final, plan.num_epochs, global_step,
                 progress_of(*position) if config.save_state or config.save_state_on_train_end else None)
    finally:
        progress.close()
        if accelerator.is_main_process:
            log.write_curves(names.output_dir / f"{config.output_name or 'last'}_curves.png")
        log.close()
    logger.info("training finished: %d steps, final LoRA %s (groups: %s)", global_step, final,
                ", ".join(group_names))
    return TrainResult(final if accelerator.is_main_process else None, global_step, losses)


# ---------------------------------------------------------------------------------------------------- the step


def batch_loss(batch: TrainBatch, *, unet, vae, network, encode_text: TextEncoding, train_text_encoder: bool,
               options: StepOptions, generator: torch.Generator, config: TrainConfig, device) -> torch.Tensor:
    """Latents and text conditioning of a batch, then the diffusion loss (`lorakit.train.step`)."""
    if batch.latents is not None:
        latents = batch.latents.to(device)
    else:
        latents = encode_latents(vae, batch.pixels, config.vae_batch_size, generator).to(device)
    latents = latents.float() * LATENT_SCALE
    if batch.text is not None:
        context, pooled = (t.to(device) for t in batch.text)
    elif train_text_encoder:
        context, pooled = encode_text(batch.captions)
    else:
        with torch.no_grad():
            context, pooled = encode_text(batch.captions)
    time_ids = batch.time_ids.to(device)

    def base_prediction(noisy, timesteps):
        network.set_multiplier(0.0)
        try:
            return predict(unet, noisy, timesteps, context, pooled, time_ids)
        finally:
            network.set_multiplier(1.0)

    return diffusion_loss(unet, latents, context, pooled, time_ids, options, generator,
                          loss_weights=batch.loss_weights, masks=None if batch.masks is None else batch.masks.to(device),
                          preserve=batch.preserve, base_prediction=base_prediction)


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


def cache_text(samples: list[Sample], components, text_encoders, config: TrainConfig, progress: bool) -> TextCache:
    """--cache_text_encoder_outputs[_to_disk]: both encoders' outputs of every processed caption, encoded once;
    caption options that would change the caption between draws are refused."""
    items = []
    for sample in samples:
        record = sample.record
        options = caption_options(record)
        check_text_caching_allowed(record.subset.table, options, {record.path: record.caption})
        items.append(TextItem(record.path, cached_caption(record.caption, options)))
    return cache_text_encoder_outputs(
        items, (components.tokenizer1, components.tokenizer2), tuple(text_encoders),
        encoders_identity=components.identity.name, max_token_length=config.max_token_length,
        weighted=config.weighted_captions, batch_size=max(s.batch_size for s in samples), progress=progress,
        to_disk=config.cache_text_encoder_outputs_to_disk, skip_check=config.skip_cache_check)


# ---------------------------------------------------------------------------------------------------- set-up pieces


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
    return Accelerator(mixed_precision=config.mixed_precision, kwargs_handlers=kwargs, cpu=cpu)


def configure_attention(config: TrainConfig, unet, vae) -> None:
    """SDPA is diffusers' default; xformers when asked and installed; --mem_eff_attn maps to SDPA."""
    if config.xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise LorakitError("--xformers: the xformers package is not installed; drop the flag (lorakit uses "
                               "torch SDPA by default) or pip install xformers") from None
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
    elif config.mem_eff_attn:
        logger.info("--mem_eff_attn: lorakit uses torch's scaled_dot_product_attention (memory-efficient kernels)")


def store_base_weights(config: TrainConfig, unet, text_encoders, compute_dtype: torch.dtype) -> None:
    """--fp8_base / --fp8_base_unet: frozen weights stored as float8_e4m3fn, each layer computed in the mixed
    dtype (diffusers' layerwise casting)."""
    if not (config.fp8_base or config.fp8_base_unet):
        return
    if compute_dtype == torch.float32:
        raise LorakitError("--fp8_base needs --mixed_precision bf16 or fp16 (the dtype layers compute in)")
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(unet, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    if config.fp8_base:
        for text_encoder in text_encoders:
            apply_layerwise_casting(text_encoder, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                    skip_modules_pattern=("embeddings", "norm"))


def make_network(config: TrainConfig, components, unet, text_encoders, vae, train_unet: bool,
                 train_text_encoder: bool):
    """Build the network (or the plug-in's), attach it, load --network_weights; returns it and its alpha."""
    module = config.network_module or LORAKIT_MODULE
    args = _network_args_dict(config)
    live_encoders = [t for t in text_encoders if t is not None]
    if config.dim_from_weights:
        if not config.network_weights:
            raise LorakitError("--dim_from_weights needs --network_weights naming the file to take ranks from")
        state, _ = read_lora(config.network_weights)
        network = network_from_file(unet, live_encoders, to_sgm_names(state, unet), config.network_weights,
                                    network_args=args, dropout=config.network_dropout, train_unet=train_unet,
                                    train_text_encoder=train_text_encoder)
    else:
        network = create_network(module, unet=unet, text_encoders=live_encoders, vae=vae,
                                  network_dim=config.network_dim, network_alpha=config.network_alpha,
                                  dropout=config.network_dropout, network_args=args,
                                  train_unet=train_unet, train_text_encoder=train_text_encoder)
    if isinstance(network, LoRANetwork):
        network.attach()
    else:
        network.apply_to(live_encoders, unet, train_text_encoder, train_unet)
    if config.network_weights:
        if isinstance(network, LoRANetwork):
            report = load_network_weights(network, config.network_weights, unet)
            if report.missing:
                logger.warning("--network_weights: %d tensors of the network are not in the file (first: %s)",
                               len(report.missing), report.missing[0])
            if report.unexpected:
                logger.warning("--network_weights: %d tensors of the file are not in the network (first: %s)",
                               len(report.unexpected), report.unexpected[0])
        else:
            network.load_weights(config.network_weights)
    alphas = {float(lora.alpha) for lora in getattr(network, "loras", [])}
    network_alpha = alphas.pop() if len(alphas) == 1 else (config.network_alpha or 0.0)
    return network, network_alpha


def _plugin_groups(network, config: TrainConfig) -> list[dict]:
    result = network.prepare_optimizer_params(config.text_encoder_lr1, config.unet_lr, config.learning_rate)
    groups = result[0] if isinstance(result, tuple) else result
    return [g if isinstance(g, dict) else {"params": list(g)} for g in groups]


def _network_args_dict(config: TrainConfig) -> dict[str, str] | None:
    if not config.network_args:
        return None
    pairs = {}
    for item in config.network_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise LorakitError(f"--network_args {item!r}: expected key=value")
        pairs[key.strip()] = value.strip()
    return pairs


def _multipliers(config: TrainConfig) -> list[float]:
    given = list(config.base_weights_multiplier or ())
    return given + [1.0] * (len(config.base_weights or ()) - len(given))


def save_network_file(network, path: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> None:
    if isinstance(network, LoRANetwork):
        save_network(network, path, dtype=dtype, metadata=metadata)
        return
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # plug-ins write the file themselves
    network.save_weights(str(partial), dtype, metadata)
    os.replace(partial, path)


def shard(batches: list, rank: int, world: int) -> list:
    """This process's share of an epoch's batches (every world-th, padded by wrapping so all ranks step equally)."""
    if world == 1:
        return batches
    padded = batches + batches[: (-len(batches)) % world]
    return padded[rank::world]


def average_gradients(params: list[torch.Tensor], accelerator: Accelerator) -> None:
    """LoRA hooks live outside DDP's forward, so gradients are averaged across processes here."""
    if accelerator.num_processes == 1:
        return
    for param in params:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
            param.grad /= accelerator.num_processes


def data_loader_workers(config: TrainConfig) -> int:
    return min(config.max_data_loader_n_workers, os.cpu_count() or 1)


def memory_estimate(config: TrainConfig) -> str:
    """A rough peak-memory figure for --dry_run, from the checkpoint's tensor shapes (no weights are read)."""
    path = config.pretrained_model_name_or_path
    if not path or not os.path.isfile(path) or not path.endswith(".safetensors"):
        return "memory estimate: needs a single-file .safetensors checkpoint"
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        counts = {}
        for key in f.keys():
            part = key.split(".")[0] if not key.startswith("conditioner") else ".".join(key.split(".")[:3])
            counts[part] = counts.get(part, 0) + math.prod(f.get_slice(key).get_shape())
    weight_bytes = 2 if config.mixed_precision in ("fp16", "bf16") else 4
    unet = counts.get("model", 0) * (1 if config.fp8_base or config.fp8_base_unet else weight_bytes)
    text = sum(v for k, v in counts.items() if k.startswith("conditioner")) * weight_bytes
    vae = counts.get("first_stage_model", 0) * (4 if config.no_half_vae else weight_bytes)
    if config.cache_text_encoder_outputs:
        text = 0
    if config.cache_latents:
        vae = 0
    gib = (unet + text + vae) / 2**30
    return (f"memory estimate: about {gib:.1f} GiB of frozen weights resident during training "
            f"(U-Net {unet / 2**30:.1f}, text encoders {text / 2**30:.1f}, VAE {vae / 2**30:.1f}), plus activations")


# ---------------------------------------------------------------------------------------------------- resuming


@dataclass(frozen=True)
class StartPosition:
    global_step: int  # optimizer steps already done (absolute)
    epoch: int  # 1-based epoch the loop starts in
    batches_done: int  # batches of that epoch already consumed (per process)


def run_seed(config: TrainConfig, resumed: TrainState | None) -> int:
    """--seed, or a resumed state's seed (the batch order and every batch's noise derive from it)."""
    if resumed is not None:
        seed = int(resumed.progress["seed"])
        if config.seed is not None and config.seed != seed:
            logger.warning("--seed %d differs from the resumed state's seed %d; using the state's", config.seed, seed)
        return seed
    return config.seed if config.seed is not None else random.randrange(2**32)


def start_position(config: TrainConfig, plan: StepPlan, resumed: TrainState | None, world: int) -> StartPosition:
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
            step = (config.initial_epoch - 1) * plan.steps_per_epoch
        if step < 0:
            raise LorakitError(f"--initial_step {step}: expected 0 or more")
        within = step % plan.steps_per_epoch
        batches = within * config.gradient_accumulation_steps if config.skip_until_initial_step else 0
        return StartPosition(step, step // plan.steps_per_epoch + 1, batches)
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


def restore(state: TrainState, network, optimizer, lr_scheduler, rank: int) -> None:
    """Network weights, optimizer, LR schedule and this rank's RNG states from a state folder."""
    try:
        network.load_state_dict(state.network)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise LorakitError(f"--resume: the state's network does not match this run's (check --network_dim, "
                           f"--network_args and the trained parts): {detail}") from None
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError) as error:
        raise LorakitError(f"--resume: the state's optimizer does not match this run's (--optimizer_type, "
                           f"learning rates): {error}") from None
    lr_scheduler.load_state_dict(state.scheduler)
    if rank >= len(state.rng):
        logger.warning("--resume: the state was saved by %d processes; rank %d starts from rank 0's RNG states",
                       len(state.rng), rank)
    set_rng_state(state.rng[rank if rank < len(state.rng) else 0])


def advance_scheduler(lr_scheduler, steps: int) -> None:
    """Move the LR schedule to --initial_step without optimizer steps."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*lr_scheduler.step", UserWarning)
        for _ in range(steps):
            lr_scheduler.step()


def batch_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The generator of one batch's noise, timesteps and on-the-fly VAE samples, seeded by its place in the run
    (global batch index across processes): a resumed run, or N processes, draw what one uninterrupted run does."""
    return torch.Generator("cpu").manual_seed(random.Random(f"lorakit-noise-{seed}-{epoch}-{batch_index}")
                                              .getrandbits(63))


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


def stop_requested(stop: StopRequest, world: int, device) -> bool:
    """Whether any process was asked to stop (all processes must stop after the same step)."""
    if world == 1:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def check_in_sync(params: list[torch.Tensor], log: bool) -> None:
    """Every process must hold the same LoRA weights (same initial weights, averaged gradients); a difference
    means a broken set-up, so it stops the run instead of saving one process's weights as the result."""
    checksum = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                            for p in params]).flatten().cpu()
    checksums = _all_gather(checksum)
    if not all(torch.equal(checksums[0], other) for other in checksums[1:]):
        raise LorakitError("the LoRA weights differ between processes; check that every process runs the same "
                           "lorakit, flags and data")
    if log:
        logger.info("LoRA weights identical on all %d processes (checksum %.17g)", len(checksums),
                    float(checksum.sum()))


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    tensor = tensor.to(device)
    gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, tensor)
    return [t.cpu() for t in gathered]
