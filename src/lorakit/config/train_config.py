"""TrainConfig: the flag table. Every field is one `--flag` of sd-scripts' `sdxl_train_network.py` (all 196 of
`train_network.py`'s `setup_parser` and `library/train_util.py`'s `add_*_arguments`) or a lorakit addition, with
its type, default, help, `--help` group and status.

Readers get typed values after `parse_train_args` has normalised them: `resolution` is `(width, height)`,
`lr_warmup_steps` an int or a ratio, list flags are tuples, `text_encoder_lr1/2` are resolved from
`--text_encoder_lr`, `optimizer_type` is never empty. A flag whose `refused` reason is set is rejected when
given with a non-default value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from lorakit.config.flags import (MAX_SIDE, Bounds, Flag, Group, flags_of, float_range, number, pair_text, resolution,
                                  steps_or_ratio)
from lorakit.data.buckets import INTERPOLATIONS  # one list for the CLI and the TOML (sd-scripts' CLI lacks `box`)
from lorakit.families import FAMILIES

MODEL = Group("model & precision", "base model, VAE, dtypes, attention, memory")
DATASET = Group("dataset", "command-line datasets; also the defaults under --dataset_config")
CACHING = Group("caching", "latent and text-encoder output caches")
NETWORK = Group("network", "the LoRA network")
OPTIMIZER = Group("optimizer & schedule", "optimizer, learning rates and schedule")
TRAINING = Group("training loop, noise, loss", "steps, epochs, noise and loss options")
SAVING = Group("saving & resume", "output files, states, resuming")
SAMPLES = Group("samples", "sample images during training")
VALIDATION = Group("validation", "held-out validation loss")
LOGGING = Group("logging", "TensorBoard / wandb trackers and console logging")
METADATA = Group("metadata", "modelspec.* metadata written into the LoRA file")
DISTRIBUTED = Group("distributed", "multi-process training through accelerate")
CONFIG = Group("config", "arguments from a TOML file")

NO_HUB = "lorakit has no Hugging Face Hub access"
NO_V2_IN_SDXL = "SDXL has no v2: train_network.py (--model_family sd1/sd2) trains SD 2.x"
_ONE_TEXT_ENCODER = "SD 1.x/2.x have one text encoder: use --text_encoder_lr"
ONE_TEXT_ENCODER = {"sd1": _ONE_TEXT_ENCODER, "sd2": _ONE_TEXT_ENCODER}
FACE_CROP = "face-centred crops from _cx_cy_w_h file names are not implemented; crops follow the bucket"
NO_DEEPSPEED = "DeepSpeed is not wired in; use accelerate launch for multi-GPU data parallel"
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensort", "ipex", "tvm")
MAX_RANK = 65536  # far above any layer's full rank; keeps a typo from allocating terabytes
AT_LEAST_0, ABOVE_0 = Bounds(0, name="a value of at least 0"), Bounds(0, low_open=True, name="a value above 0")
AT_LEAST_1 = Bounds(1, name="a positive integer")
PROBABILITY = Bounds(0, 1, name="a probability from 0 to 1")
FRACTION = Bounds(0, 1, high_open=True, name="a fraction from 0 to below 1")
SIDE = Bounds(1, MAX_SIDE, name=f"a side from 1 to {MAX_SIDE} pixels")
SEED = Bounds(0, 2**32 - 1, name=f"a seed from 0 to {2**32 - 1}")  # what numpy's and accelerate's set_seed accept
TIMESTEP = Bounds(0, 1000, name="a timestep from 0 to 1000")


@dataclass(frozen=True)
class TrainConfig:
    # --- model & precision ---
    pretrained_model_name_or_path: str | None = MODEL.flag(
        None, str, "SDXL base model: single-file .safetensors/.ckpt or a diffusers folder", metavar="PATH")
    vae: str | None = MODEL.flag(None, str, "replacement VAE: single file or diffusers folder", metavar="PATH")
    model_family: str | None = MODEL.flag(
        None, str, "the base model's family: sdxl (sdxl_train_network.py's), sd1 or sd2 (train_network.py's; "
        "--v2 picks sd2)", choices=tuple(FAMILIES), kohya=False)
    v2: bool = MODEL.switch("Stable Diffusion 2.x model (train_network.py)", refused=NO_V2_IN_SDXL,
                            families={"sd1": None, "sd2": None})
    v_parameterization: bool = MODEL.switch("v-prediction target (for SDXL v-pred models)")
    tokenizer_cache_dir: str | None = MODEL.flag(
        None, str, "folder to save the tokenizers to and load them from (lorakit ships the vocabulary and never "
        "downloads)", metavar="PATH")
    disable_mmap_load_safetensors: bool = MODEL.switch(
        "do not memory-map the checkpoint (lorakit never does: it reads it tensor by tensor, so RSS stays at one "
        "model)")
    mixed_precision: str = MODEL.flag("no", str, "autocast dtype; frozen weights are stored in it too",
                                      choices=("no", "fp16", "bf16"))
    full_fp16: bool = MODEL.switch("LoRA weights and gradients in fp16 (needs --mixed_precision fp16)")
    full_bf16: bool = MODEL.switch("LoRA weights and gradients in bf16 (needs --mixed_precision bf16)")
    fp8_base: bool = MODEL.switch("store U-Net and text-encoder weights as float8_e4m3fn (needs mixed precision)")
    fp8_base_unet: bool = MODEL.switch("store only the U-Net weights as float8_e4m3fn")
    no_half_vae: bool = MODEL.switch("keep the VAE in fp32 under mixed precision (the SDXL VAE overflows in fp16)")
    lowram: bool = MODEL.switch(
        "load models straight to the GPU", refused="GPU placement during loading and caching is not tunable yet")
    highvram: bool = MODEL.switch(
        "keep the CUDA cache between latent-cache batches",
        refused="GPU placement during loading and caching is not tunable yet")
    mem_eff_attn: bool = MODEL.switch("memory-efficient attention (lorakit uses torch SDPA for it)")
    xformers: bool = MODEL.switch("xformers attention in the U-Net and VAE (when xformers is installed)")
    sdpa: bool = MODEL.switch("torch scaled_dot_product_attention in the U-Net (lorakit's default)")
    torch_compile: bool = MODEL.switch("compile the U-Net with torch.compile")
    dynamo_backend: str = MODEL.flag("inductor", str, "torch.compile backend", choices=DYNAMO_BACKENDS)
    gradient_checkpointing: bool = MODEL.switch("recompute U-Net (and trained text-encoder) activations in "
                                                "the backward pass to save memory")
    gradient_checkpointing_blocks: str = MODEL.flag(
        "auto", str, "with --gradient_checkpointing: 'auto' checkpoints only the U-Net blocks the memory budget "
        "needs (largest saving first; every block on a CPU without --memory_budget_gb), 'all' every block "
        "as sd-scripts does", choices=("auto", "all"), kohya=False)
    memory_budget_gb: float | None = MODEL.flag(
        None, number, "with --gradient_checkpointing: the step's peak memory to plan for, in GiB (default: 90% of "
        "the GPU's free memory; on a CPU, every block is checkpointed unless this is given)", kohya=False,
        bounds=ABOVE_0, metavar="GIB")
    cpu_offload_checkpointing: bool = MODEL.switch(
        "offload checkpointed activations to the CPU",
        refused="sd-scripts itself fails with it for SDXL; lorakit does not offload activations yet")

    # --- dataset ---
    dataset_config: str | None = DATASET.flag(None, str, "dataset TOML/JSON; replaces --train_data_dir, "
                                              "--reg_data_dir and --in_json", metavar="PATH")
    train_data_dir: str | None = DATASET.flag(None, str, "folder of N_name subfolders (DreamBooth) or of the "
                                              "images of --in_json", metavar="PATH")
    reg_data_dir: str | None = DATASET.flag(None, str, "folder of N_name regularisation subfolders", metavar="PATH")
    in_json: str | None = DATASET.flag(None, str, "fine-tuning metadata JSON (captions per image)", metavar="PATH")
    dataset_repeats: int = DATASET.flag(1, int, "repeats of each image per epoch (fine-tuning datasets)",
                                        bounds=AT_LEAST_1)
    resolution: tuple[int, int] | None = DATASET.flag(None, resolution, "training resolution: SIZE or WIDTH,HEIGHT",
                                                      to_file=pair_text)
    train_batch_size: int = DATASET.flag(1, int, "images per batch", bounds=AT_LEAST_1)
    enable_bucket: bool = DATASET.switch("aspect-ratio bucketing")
    min_bucket_reso: int = DATASET.flag(256, int, "smallest bucket side in pixels", bounds=SIDE)
    max_bucket_reso: int = DATASET.flag(1024, int, "largest bucket side in pixels", bounds=SIDE)
    bucket_reso_steps: int = DATASET.flag(64, int, "bucket side granularity in pixels (a multiple of 32 for SDXL)",
                                          bounds=Bounds(32, MAX_SIDE, name=f"a step from 32 to {MAX_SIDE} pixels"))
    bucket_no_upscale: bool = DATASET.switch("per-image buckets that never upscale")
    resize_interpolation: str | None = DATASET.flag(
        None, str, "resize filter (default: area to shrink, lanczos to enlarge)", choices=INTERPOLATIONS)
    caption_extension: str = DATASET.flag(".caption", str, "caption file extension")
    caption_extention: str | None = DATASET.flag(None, str, "misspelled alias of --caption_extension (wins)")
    caption_separator: str = DATASET.flag(",", str, "tag separator in captions")
    shuffle_caption: bool = DATASET.switch("shuffle the separated tags")
    keep_tokens: int = DATASET.flag(0, int, "keep the first N tags in place (not shuffled or dropped)",
                                    bounds=AT_LEAST_0)
    keep_tokens_separator: str = DATASET.flag("", str, "marker ending the fixed part of a caption (e.g. |||)")
    secondary_separator: str | None = DATASET.flag(None, str, "separator inside a tag, replaced by "
                                                   "--caption_separator after shuffling")
    enable_wildcard: bool = DATASET.switch("{a|b} wildcards and multi-line captions")
    caption_prefix: str | None = DATASET.flag(None, str, "text prepended to every caption")
    caption_suffix: str | None = DATASET.flag(None, str, "text appended to every caption")
    caption_dropout_rate: float = DATASET.flag(0.0, number, "probability of an empty caption per sample",
                                               bounds=PROBABILITY)
    caption_dropout_every_n_epochs: int = DATASET.flag(0, int, "empty captions for every Nth epoch", bounds=AT_LEAST_0)
    caption_tag_dropout_rate: float = DATASET.flag(0.0, number, "probability of dropping each tag", bounds=PROBABILITY)
    token_warmup_min: int = DATASET.flag(1, int, "tags used at step 0 of the tag-count warm-up", bounds=AT_LEAST_0)
    token_warmup_step: float = DATASET.flag(0.0, number, "step at which all tags are used (<1: fraction of "
                                            "the total steps)", bounds=AT_LEAST_0)
    color_aug: bool = DATASET.switch("weak hue augmentation (not with cached latents)")
    flip_aug: bool = DATASET.switch("random horizontal flips (cached latents keep both orientations)")
    random_crop: bool = DATASET.switch("random instead of centred crop (not with cached latents)")
    face_crop_aug_range: tuple[float, float] | None = DATASET.flag(
        None, float_range, "face-centred crop scale range (file names end in _cx_cy_w_h)", to_file=pair_text,
        refused=FACE_CROP)
    alpha_mask: bool = DATASET.switch("use the image alpha channel as loss mask")
    cache_info: bool = DATASET.switch("keep captions and image sizes in metadata_cache.json per folder")
    debug_dataset: bool = DATASET.switch(
        "show batches in a window instead of training",
        refused="it opens an OpenCV window; --dry_run prints the dataset summary")
    dataset_class: str | None = DATASET.flag(
        None, str, "python class of a custom dataset", metavar="MODULE.CLASS",
        refused="custom dataset classes; describe the data with --dataset_config")
    prior_loss_weight: float = DATASET.flag(1.0, number, "loss weight of regularisation images", bounds=AT_LEAST_0)
    conditioning_data_dir: str | None = DATASET.flag(None, str, "folder of loss masks (masked loss)", metavar="PATH")
    masked_loss: bool = DATASET.switch("weight the loss by masks from conditioning_data_dir")

    # --- caching ---
    cache_latents: bool = CACHING.switch("encode every image with the VAE once and keep the latents in memory")
    cache_latents_to_disk: bool = CACHING.switch("store the latent cache next to the images (implies "
                                                 "--cache_latents)")
    vae_batch_size: int = CACHING.flag(1, int, "images per VAE batch while caching latents", bounds=AT_LEAST_1)
    cache_text_encoder_outputs: bool = CACHING.switch("encode every caption once (trains the U-Net only)")
    cache_text_encoder_outputs_to_disk: bool = CACHING.switch(
        "store the text-encoder cache next to the images (implies --cache_text_encoder_outputs)")
    skip_cache_check: bool = CACHING.switch(
        "use existing cache files that read back with the right shapes without comparing their fingerprints")

    # --- network ---
    network_module: str | None = NETWORK.flag(None, str, "network module: networks.lora or lycoris.kohya",
                                              metavar="MODULE")
    network_dim: int | None = NETWORK.flag(None, int, "LoRA rank (networks.lora: 4 when not given)",
                                           bounds=Bounds(1, MAX_RANK, name=f"a rank from 1 to {MAX_RANK}"))
    network_alpha: float = NETWORK.flag(1, number, "LoRA alpha; the update is scaled by alpha / rank",
                                        bounds=AT_LEAST_0)
    network_dropout: float | None = NETWORK.flag(None, number, "dropout on the LoRA down output while training",
                                                 bounds=FRACTION)
    network_args: tuple[str, ...] | None = NETWORK.flag(
        None, str, "extra network options (conv_dim, block_dims, algo=lora|dora|loha|lokr, ...: "
        "docs/network-types.md)", many=True, metavar="KEY=VALUE")
    network_weights: str | None = NETWORK.flag(None, str, "LoRA file to start from", metavar="PATH")
    dim_from_weights: bool = NETWORK.switch("take ranks and alphas from --network_weights")
    network_train_unet_only: bool = NETWORK.switch("LoRA on the U-Net only")
    network_train_text_encoder_only: bool = NETWORK.switch("LoRA on the text encoders only")
    base_weights: tuple[str, ...] | None = NETWORK.flag(None, str, "LoRA files merged into the base model first",
                                                        many=True, metavar="PATH")
    base_weights_multiplier: tuple[float, ...] | None = NETWORK.flag(
        None, number, "multipliers of --base_weights (1.0 each by default)", many=True)
    scale_weight_norms: float | None = NETWORK.flag(None, number, "max norm of each LoRA up*down product",
                                                    bounds=ABOVE_0)
    training_comment: str | None = NETWORK.flag(None, str, "comment stored as ss_training_comment")
    ema_decay: float | None = NETWORK.flag(
        None, number, "keep an exponential moving average of the trained weights with this decay (e.g. 0.999) and "
        "save it beside each LoRA as {name}-ema.safetensors", kohya=False,
        bounds=Bounds(0, 1, low_open=True, high_open=True, name="a decay above 0 and below 1"))
    ema_update_after_step: int = NETWORK.flag(0, int, "EMA warm-up: until this step the average is the weights "
                                              "themselves", kohya=False, bounds=AT_LEAST_0)
    ema_update_every: int = NETWORK.flag(1, int, "update the EMA every N optimizer steps", kohya=False,
                                         bounds=AT_LEAST_1)
    ema_on_cpu: bool = NETWORK.switch("keep the EMA on the CPU instead of the training device", kohya=False)
    sample_with_ema: bool = SAMPLES.switch("make samples with the EMA weights", kohya=False)

    # --- optimizer & schedule ---
    optimizer_type: str = OPTIMIZER.flag(
        "", str, "optimizer name (AdamW, AdamW8bit, Lion, SGDNesterov, Prodigy, DAdaptAdam, Adafactor, "
        "AdamWScheduleFree, ...) or a dotted class path; empty means AdamW", metavar="NAME")
    optimizer_args: tuple[str, ...] | None = OPTIMIZER.flag(None, str, "optimizer keyword arguments (Python "
                                                            "literals)", many=True, metavar="KEY=VALUE")
    use_8bit_adam: bool = OPTIMIZER.switch("legacy alias of --optimizer_type AdamW8bit")
    use_lion_optimizer: bool = OPTIMIZER.switch("legacy alias of --optimizer_type Lion")
    learning_rate: float = OPTIMIZER.flag(2e-6, number, "learning rate of every group without its own",
                                          bounds=AT_LEAST_0)
    unet_lr: float | None = OPTIMIZER.flag(None, number, "U-Net LoRA learning rate", bounds=AT_LEAST_0)
    text_encoder_lr: tuple[float, ...] | None = OPTIMIZER.flag(
        None, number, "text-encoder learning rates: one value for both, or TE1 TE2", many=True, bounds=AT_LEAST_0)
    text_encoder_lr1: float | None = OPTIMIZER.flag(None, number, "TE1 (CLIP ViT-L) learning rate; wins over "
                                                    "--text_encoder_lr", kohya=False, families=ONE_TEXT_ENCODER,
                                                    bounds=AT_LEAST_0)
    text_encoder_lr2: float | None = OPTIMIZER.flag(None, number, "TE2 (OpenCLIP ViT-bigG) learning rate; wins "
                                                    "over --text_encoder_lr", kohya=False, families=ONE_TEXT_ENCODER,
                                                    bounds=AT_LEAST_0)
    max_grad_norm: float = OPTIMIZER.flag(1.0, number, "gradient clipping norm; 0 disables", bounds=AT_LEAST_0)
    lr_scheduler: str = OPTIMIZER.flag("constant", str, "learning-rate schedule", choices=SCHEDULERS)
    lr_warmup_steps: int | float = OPTIMIZER.flag(0, steps_or_ratio, "warm-up steps, or a ratio (<1 or N%) of "
                                                  "the total")
    lr_decay_steps: int | float = OPTIMIZER.flag(0, steps_or_ratio, "decay steps of warmup_stable_decay, or a "
                                                 "ratio (<1 or N%) of the total")
    lr_scheduler_num_cycles: int = OPTIMIZER.flag(1, int, "restarts of cosine_with_restarts", bounds=AT_LEAST_1)
    lr_scheduler_power: float = OPTIMIZER.flag(1, number, "power of the polynomial schedule", bounds=ABOVE_0)
    lr_scheduler_timescale: int | None = OPTIMIZER.flag(None, int, "timescale of inverse_sqrt", bounds=AT_LEAST_1)
    lr_scheduler_min_lr_ratio: float | None = OPTIMIZER.flag(None, number, "final LR ratio of cosine_with_min_lr "
                                                             "and warmup_stable_decay", bounds=PROBABILITY)
    lr_scheduler_type: str = OPTIMIZER.flag("", str, "custom scheduler class (torch name or dotted path); "
                                            "wins over --lr_scheduler", metavar="CLASS")
    lr_scheduler_args: tuple[str, ...] | None = OPTIMIZER.flag(None, str, "scheduler keyword arguments (Python "
                                                               "literals)", many=True, metavar="KEY=VALUE")
    fused_backward_pass: bool = OPTIMIZER.switch("step each parameter as soon as its gradient is ready and free "
                                                 "the gradient (no gradient accumulation)")

    # --- training loop, noise, loss ---
    max_train_steps: int = TRAINING.flag(1600, int, "optimizer steps (replaced by --max_train_epochs)",
                                         bounds=AT_LEAST_1)
    max_train_epochs: int | None = TRAINING.flag(None, int, "epochs to train", bounds=AT_LEAST_1)
    gradient_accumulation_steps: int = TRAINING.flag(1, int, "batches per optimizer step", bounds=AT_LEAST_1)
    seed: int | None = TRAINING.flag(None, int, "random seed (random when not given)", bounds=SEED)
    max_data_loader_n_workers: int = TRAINING.flag(8, int, "data-loader worker processes (at most the CPU count)",
                                                   bounds=AT_LEAST_0)
    persistent_data_loader_workers: bool = TRAINING.switch("keep data-loader workers between epochs")
    max_token_length: int | None = TRAINING.flag(None, int, "caption length in tokens (75 when not given)",
                                                 choices=(150, 225))
    clip_skip: int | None = TRAINING.flag(None, int, "SD 1.x/2.x: use the N-th text-encoder layer from the end "
                                          "(2 for many anime models); SDXL ignores it (stored in metadata)",
                                          bounds=AT_LEAST_1)
    weighted_captions: bool = TRAINING.switch("(tag:1.2) caption weights")
    noise_offset: float | None = TRAINING.flag(None, number, "offset noise strength (about 0.0357 for SDXL)",
                                               bounds=AT_LEAST_0)
    noise_offset_random_strength: bool = TRAINING.switch("scale the noise offset by U(0,1) each step")
    adaptive_noise_scale: float | None = TRAINING.flag(None, number, "add this times |mean latent| to the noise "
                                                       "offset (needs --noise_offset)")
    multires_noise_iterations: int | None = TRAINING.flag(None, int, "pyramid noise iterations (6-10)",
                                                          bounds=AT_LEAST_0)
    multires_noise_discount: float = TRAINING.flag(0.3, number, "pyramid noise discount", bounds=PROBABILITY)
    ip_noise_gamma: float | None = TRAINING.flag(None, number, "input-perturbation noise strength (about 0.1)",
                                                 bounds=AT_LEAST_0)
    ip_noise_gamma_random_strength: bool = TRAINING.switch("scale --ip_noise_gamma by U(0,1) each step")
    zero_terminal_snr: bool = TRAINING.switch("rescale the noise schedule to zero terminal SNR")
    min_timestep: int | None = TRAINING.flag(None, int, "lowest timestep sampled (0 when not given)",
                                             bounds=TIMESTEP)
    max_timestep: int | None = TRAINING.flag(None, int, "timestep bound, exclusive (1000 when not given)",
                                             bounds=TIMESTEP)
    loss_type: str = TRAINING.flag("l2", str, "loss function", choices=("l1", "l2", "huber", "smooth_l1"))
    huber_schedule: str = TRAINING.flag("snr", str, "Huber threshold schedule over timesteps",
                                        choices=("constant", "exponential", "snr"))
    huber_c: float = TRAINING.flag(0.1, number, "Huber threshold", bounds=ABOVE_0)
    huber_scale: float = TRAINING.flag(1.0, number, "Huber scale (constant and exponential schedules)", bounds=ABOVE_0)
    min_snr_gamma: float | None = TRAINING.flag(None, number, "Min-SNR loss weighting gamma (5 is typical)",
                                                bounds=ABOVE_0)
    scale_v_pred_loss_like_noise_pred: bool = TRAINING.switch("weight the v-prediction loss like the noise loss "
                                                              "(needs --v_parameterization)")
    v_pred_like_loss: float | None = TRAINING.flag(None, number, "add a v-prediction-like loss term of this "
                                                   "weight (epsilon models only)", bounds=AT_LEAST_0)
    debiased_estimation_loss: bool = TRAINING.switch("weight the loss by 1/sqrt(SNR)")
    initial_epoch: int | None = TRAINING.flag(None, int, "number of the first epoch (1 = first)", bounds=AT_LEAST_1)
    initial_step: int | None = TRAINING.flag(None, int, "global step to start at (wins over --initial_epoch)",
                                             bounds=AT_LEAST_0)
    skip_until_initial_step: bool = TRAINING.switch("skip batches until --initial_step")
    dry_run: bool = TRAINING.switch("print the start-up summary and memory estimate, then exit before loading "
                                    "weights", kohya=False)

    # --- saving & resume ---
    output_dir: str | None = SAVING.flag(None, str, "folder for the LoRA files (created)", metavar="PATH")
    output_name: str | None = SAVING.flag(None, str, "base name of the LoRA files")
    save_model_as: str = SAVING.flag("safetensors", str, "file format; ckpt and pt carry no metadata",
                                     choices=("safetensors", "ckpt", "pt"))
    save_precision: str | None = SAVING.flag(None, str, "dtype of the saved weights (default: as trained)",
                                             choices=("float", "fp16", "bf16"))
    save_every_n_epochs: int | None = SAVING.flag(None, int, "save every N epochs", bounds=AT_LEAST_1)
    save_every_n_steps: int | None = SAVING.flag(None, int, "save every N steps", bounds=AT_LEAST_1)
    save_n_epoch_ratio: int | None = SAVING.flag(None, int, "save about N times over the run", bounds=AT_LEAST_1)
    save_last_n_epochs: int | None = SAVING.flag(None, int, "keep only the last N epoch files", bounds=AT_LEAST_1)
    save_last_n_epochs_state: int | None = SAVING.flag(None, int, "keep only the last N epoch states",
                                                       bounds=AT_LEAST_1)
    save_last_n_steps: int | None = SAVING.flag(None, int, "delete step files older than N steps", bounds=AT_LEAST_1)
    save_last_n_steps_state: int | None = SAVING.flag(None, int, "delete step states older than N steps",
                                                      bounds=AT_LEAST_1)
    save_state: bool = SAVING.switch("save the training state with every saved LoRA and at the end")
    save_state_on_train_end: bool = SAVING.switch("save the training state at the end")
    resume: str | None = SAVING.flag(None, str, "state folder to resume from", metavar="PATH")
    no_metadata: bool = SAVING.switch("write only the minimal metadata")
    huggingface_repo_id: str | None = SAVING.flag(None, str, "Hub repository to upload to", refused=NO_HUB)
    huggingface_repo_type: str | None = SAVING.flag(None, str, "Hub repository type", refused=NO_HUB)
    huggingface_path_in_repo: str | None = SAVING.flag(None, str, "path in the Hub repository", refused=NO_HUB)
    huggingface_token: str | None = SAVING.flag(None, str, "Hugging Face Hub access token", refused=NO_HUB, secret=True)
    huggingface_repo_visibility: str | None = SAVING.flag(None, str, "Hub repository visibility", refused=NO_HUB)
    save_state_to_huggingface: bool = SAVING.switch("upload states to the Hub", refused=NO_HUB)
    resume_from_huggingface: bool = SAVING.switch("resume from a Hub state", refused=NO_HUB)
    async_upload: bool = SAVING.switch("upload to the Hub in the background", refused=NO_HUB)

    # --- samples ---
    sample_prompts: str | None = SAMPLES.flag(None, str, "prompt file (.txt, .toml or .json)", metavar="PATH")
    sample_every_n_steps: int | None = SAMPLES.flag(None, int, "sample every N steps (<= 0: never)")
    sample_every_n_epochs: int | None = SAMPLES.flag(None, int, "sample every N epochs (<= 0: never; wins over "
                                                     "steps)")
    sample_at_first: bool = SAMPLES.switch("sample before training")
    sample_sampler: str = SAMPLES.flag("ddim", str, "sampler of the sample images", choices=SAMPLERS)

    # --- validation ---
    validation_split: float = VALIDATION.flag(0.0, number, "fraction of each DreamBooth dataset held out",
                                              bounds=FRACTION)
    validation_seed: int | None = VALIDATION.flag(None, int, "seed of the split and of the validation noise",
                                                  bounds=SEED)
    validate_every_n_steps: int | None = VALIDATION.flag(None, int, "validate every N steps", bounds=AT_LEAST_1)
    validate_every_n_epochs: int | None = VALIDATION.flag(None, int, "validate every N epochs (default: every "
                                                          "epoch when there is a validation set)", bounds=AT_LEAST_1)
    max_validation_steps: int | None = VALIDATION.flag(None, int, "at most N validation batches", bounds=AT_LEAST_1)

    # --- logging ---
    logging_dir: str | None = LOGGING.flag(None, str, "tracker log folder (enables TensorBoard)", metavar="PATH")
    log_with: str | None = LOGGING.flag(None, str, "trackers (default: tensorboard when --logging_dir is given)",
                                        choices=("tensorboard", "wandb", "all"))
    log_prefix: str | None = LOGGING.flag(None, str, "prefix of the run folder name")
    log_tracker_name: str | None = LOGGING.flag(None, str, "tracker project name (default: network_train)")
    log_tracker_config: str | None = LOGGING.flag(None, str, "TOML of tracker init arguments", metavar="PATH")
    wandb_run_name: str | None = LOGGING.flag(None, str, "wandb run name")
    wandb_api_key: str | None = LOGGING.flag(None, str, "wandb API key (log in before training)", secret=True)
    log_config: bool = LOGGING.switch("log the arguments (without paths and keys) as tracker config")
    console_log_level: str | None = LOGGING.flag(None, str, "console log level (default: INFO)",
                                                 choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    console_log_file: str | None = LOGGING.flag(None, str, "log to this file instead of stderr", metavar="PATH")
    console_log_simple: bool = LOGGING.switch("plain console log format")
    events_log: str | None = LOGGING.flag(
        None, str, "append the run's events (progress, losses, samples, saves, its end) to this file as JSON lines, "
        "for programs that watch the run such as lorakit ui", metavar="PATH", kohya=False)

    # --- metadata ---
    metadata_title: str | None = METADATA.flag(None, str, "modelspec.title (default: --output_name)")
    metadata_author: str | None = METADATA.flag(None, str, "modelspec.author")
    metadata_description: str | None = METADATA.flag(None, str, "modelspec.description")
    metadata_license: str | None = METADATA.flag(None, str, "modelspec.license")
    metadata_tags: str | None = METADATA.flag(None, str, "modelspec.tags, comma separated")
    metadata_usage_hint: str | None = METADATA.flag(None, str, "modelspec.usage_hint")
    metadata_thumbnail: str | None = METADATA.flag(None, str, "modelspec.thumbnail: image file or data: URL")
    metadata_merged_from: str | None = METADATA.flag(None, str, "modelspec.merged_from")
    metadata_trigger_phrase: str | None = METADATA.flag(None, str, "modelspec.trigger_phrase")
    metadata_preprocessor: str | None = METADATA.flag(None, str, "modelspec.preprocessor")
    metadata_is_negative_embedding: str | None = METADATA.flag(None, str, "modelspec.is_negative_embedding")

    # --- distributed ---
    ddp_timeout: int | None = DISTRIBUTED.flag(None, int, "DDP timeout in minutes",
                                               bounds=Bounds(1, 10**6, name="from 1 to 1000000 minutes"))
    ddp_gradient_as_bucket_view: bool = DISTRIBUTED.switch("DDP gradient_as_bucket_view")
    ddp_static_graph: bool = DISTRIBUTED.switch("DDP static_graph")
    deepspeed: bool = DISTRIBUTED.switch("train with DeepSpeed", refused=NO_DEEPSPEED)
    zero_stage: int = DISTRIBUTED.flag(2, int, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3), refused=NO_DEEPSPEED)
    offload_optimizer_device: str | None = DISTRIBUTED.flag(None, str, "DeepSpeed optimizer offload device",
                                                            choices=("cpu", "nvme"), refused=NO_DEEPSPEED)
    offload_optimizer_nvme_path: str | None = DISTRIBUTED.flag(None, str, "DeepSpeed optimizer NVMe path",
                                                               metavar="PATH", refused=NO_DEEPSPEED)
    offload_param_device: str | None = DISTRIBUTED.flag(None, str, "DeepSpeed parameter offload device",
                                                        choices=("cpu", "nvme"), refused=NO_DEEPSPEED)
    offload_param_nvme_path: str | None = DISTRIBUTED.flag(None, str, "DeepSpeed parameter NVMe path",
                                                           metavar="PATH", refused=NO_DEEPSPEED)
    zero3_init_flag: bool = DISTRIBUTED.switch("DeepSpeed ZeRO-3 init", refused=NO_DEEPSPEED)
    zero3_save_16bit_model: bool = DISTRIBUTED.switch("DeepSpeed ZeRO-3 16-bit save", refused=NO_DEEPSPEED)
    fp16_master_weights_and_gradients: bool = DISTRIBUTED.switch("DeepSpeed fp16 master weights",
                                                                 refused=NO_DEEPSPEED)

    # --- config ---
    config_file: str | None = CONFIG.flag(None, str, "TOML of arguments (.toml added if missing); the command "
                                          "line wins over it", metavar="PATH")
    output_config: bool = CONFIG.switch("write the given arguments to --config_file and exit")


FLAGS = tuple(flags_of(TrainConfig))


def iter_flags() -> Iterator[Flag]:
    """Every flag of the table, in `--help` order."""
    return iter(FLAGS)


GROUPS = (MODEL, DATASET, CACHING, NETWORK, OPTIMIZER, TRAINING, SAVING, SAMPLES, VALIDATION, LOGGING, METADATA,
          DISTRIBUTED, CONFIG)
