"""Normalisation (sd-scripts' post-parse adjustments) and cross-flag validation, table-driven."""

from __future__ import annotations

import logging

import pytest

from lorakit.config import parse_train_args
from lorakit.errors import LorakitError

BASE = ["--pretrained_model_name_or_path", "model.safetensors", "--dataset_config", "data.toml"]


@pytest.mark.parametrize("argv, name, expected", [
    (["--caption_extention", "txt"], "caption_extension", ".txt"),
    (["--caption_extension", ".txt", "--caption_extention", ".cap"], "caption_extension", ".cap"),
    (["--caption_extension", "txt"], "caption_extension", ".txt"),
    (["--resolution", "768"], "resolution", (768, 768)),
    (["--resolution", "1024,768"], "resolution", (1024, 768)),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "0.05"], "lr_warmup_steps", 0.05),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "20%"], "lr_warmup_steps", 0.2),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "200"], "lr_warmup_steps", 200),
    (["--lr_decay_steps", "1.0"], "lr_decay_steps", 1),
    (["--sample_every_n_steps", "0"], "sample_every_n_steps", None),
    (["--sample_every_n_epochs", "-1"], "sample_every_n_epochs", None),
    (["--sample_every_n_epochs", "2"], "sample_every_n_epochs", 2),
    (["--cache_latents_to_disk"], "cache_latents", True),
    (["--cache_text_encoder_outputs_to_disk"], "cache_text_encoder_outputs", True),
    (["--use_8bit_adam"], "optimizer_type", "AdamW8bit"),
    (["--use_lion_optimizer"], "optimizer_type", "Lion"),
    ([], "optimizer_type", "AdamW"),
    (["--optimizer_type", "adafactor"], "optimizer_type", "adafactor"),
    (["--network_args", "conv_dim=4", "algo=locon"], "network_args", ("conv_dim=4", "algo=locon")),
    (["--base_weights", "a", "b", "--base_weights_multiplier", "0.5", "1"], "base_weights_multiplier",
     (0.5, 1.0)),
])
def test_normalisation(argv, name, expected):
    value = getattr(parse_train_args(BASE + argv), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("argv, message", [
    (["--lr_warmup_steps", "1.5"], "argument --lr_warmup_steps: expected an integer step count, a ratio below 1 "
                                   "or N%, found '1.5'"),
    (["--lr_warmup_steps", "150%"], "argument --lr_warmup_steps: expected an integer step count, a ratio below 1 "
                                    "or N%, found '150%'"),
    (["--resolution", "1024x768"], "argument --resolution: expected SIZE or WIDTH,HEIGHT in pixels, found "
                                   "'1024x768'"),
    (["--face_crop_aug_range", "3,2"], "argument --face_crop_aug_range: expected MIN,MAX with MIN <= MAX, found "
                                       "'3,2'"),
    (["--adaptive_noise_scale", "0.01"], "--adaptive_noise_scale adds to the noise offset: it needs --noise_offset"),
    (["--scale_v_pred_loss_like_noise_pred"], "--scale_v_pred_loss_like_noise_pred needs --v_parameterization"),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], "--v_pred_like_loss is for epsilon models: drop it or "
                                                            "--v_parameterization"),
    (["--full_fp16"], "--full_fp16 needs --mixed_precision fp16, found no"),
    (["--full_bf16", "--mixed_precision", "fp16"], "--full_bf16 needs --mixed_precision bf16, found fp16"),
    (["--fp8_base"], "--fp8_base computes in the mixed-precision dtype: add --mixed_precision bf16 or fp16"),
    (["--bucket_reso_steps", "48"], "--bucket_reso_steps 48: SDXL needs a multiple of 32"),
    (["--min_bucket_reso", "2048"], "--min_bucket_reso 2048 is larger than --max_bucket_reso 1024"),
    (["--min_timestep", "500", "--max_timestep", "500"], "--min_timestep 500 / --max_timestep 500: expected "
                                                         "0 <= min < max <= 1000"),
    (["--max_timestep", "1001"], "--max_timestep 1001: expected a timestep from 0 to 1000"),
    (["--learning_rate", "nan"], "argument --learning_rate: expected a finite number, found 'nan'"),
    (["--max_grad_norm", "-1"], "--max_grad_norm -1.0: expected a value of at least 0"),
    (["--seed", "-1"], "--seed -1: expected a seed from 0 to 4294967295"),
    (["--text_encoder_lr", "1e-4", "inf"], "argument --text_encoder_lr: expected a finite number, found 'inf'"),
    (["--max_bucket_reso", str(2**62)], f"--max_bucket_reso {2**62}: expected a side from 1 to 8192 pixels"),
    (["--train_batch_size", "0"], "--train_batch_size 0: expected a positive integer"),
    (["--network_dim", "-4"], "--network_dim -4: expected a rank from 1 to 65536"),
    (["--caption_dropout_rate", "1.5"], "--caption_dropout_rate 1.5: expected a probability from 0 to 1"),
    (["--validation_split", "1.0"], "--validation_split 1.0: expected a fraction from 0 to below 1"),
    (["--use_8bit_adam", "--use_lion_optimizer"], "--use_8bit_adam and --use_lion_optimizer contradict; give "
                                                  "--optimizer_type instead"),
    (["--use_8bit_adam", "--optimizer_type", "Lion"], "--use_8bit_adam and --optimizer_type Lion contradict; "
                                                      "keep one"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"],
     "--network_train_unet_only and --network_train_text_encoder_only together leave nothing to train"),
    (["--cache_text_encoder_outputs", "--network_train_text_encoder_only"],
     "--cache_text_encoder_outputs freezes the text encoders, so --network_train_text_encoder_only has nothing "
     "to train"),
    (["--cache_text_encoder_outputs", "--shuffle_caption"],
     "--shuffle_caption changes captions between steps, but --cache_text_encoder_outputs encodes each caption "
     "once: drop one of them"),
    (["--cache_text_encoder_outputs_to_disk", "--caption_dropout_rate", "0.1"],
     "--caption_dropout_rate changes captions between steps, but --cache_text_encoder_outputs encodes each "
     "caption once: drop one of them"),
    (["--cache_latents_to_disk", "--color_aug"],
     "--color_aug changes images between steps, but --cache_latents encodes each image once: drop one of them"),
    (["--cache_latents", "--random_crop"],
     "--random_crop changes images between steps, but --cache_latents encodes each image once: drop one of them"),
    (["--dim_from_weights"], "--dim_from_weights needs --network_weights to read the ranks from"),
    (["--base_weights_multiplier", "0.5"], "--base_weights_multiplier has 1 values for 0 --base_weights files"),
    (["--fused_backward_pass", "--gradient_accumulation_steps", "4"],
     "--fused_backward_pass steps each parameter as soon as its gradient is ready, so it cannot accumulate over "
     "--gradient_accumulation_steps 4"),
    (["--lr_warmup_steps", "100"], "--lr_warmup_steps 100 is not used by constant: use --lr_scheduler "
                                   "constant_with_warmup, or drop the warm-up"),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_warmup_steps", "0.1",
      "--lr_scheduler", "cosine"],
     "--lr_warmup_steps 0.1 is not used by torch.optim.lr_scheduler.StepLR: use --lr_scheduler "
     "constant_with_warmup, or drop the warm-up"),
    (["--v2"], "--v2 does not apply to --model_family sdxl (SDXL has no v2: train_network.py (--model_family sd1/sd2) trains "
              "SD 2.x)"),
    (["--mixed_precision", "fp32"], "argument --mixed_precision: invalid choice: 'fp32' (choose from 'no', "
                                    "'fp16', 'bf16')"),
])
def test_contradictions_are_one_line_errors(argv, message):
    with pytest.raises(LorakitError) as error:
        parse_train_args(BASE + argv)
    assert str(error.value) == message


@pytest.mark.parametrize("argv, message", [
    ([], "missing --pretrained_model_name_or_path (an SDXL .safetensors file or diffusers folder)"),
    (["--pretrained_model_name_or_path", "m"], "no dataset: give --dataset_config (a dataset TOML) or "
                                               "--train_data_dir"),
    (["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"], "--train_data_dir needs --resolution "
                                                                        "(e.g. 1024 or 1024,768)"),
])
def test_missing_inputs_are_named(argv, message):
    with pytest.raises(LorakitError) as error:
        parse_train_args(argv)
    assert str(error.value) == message


def test_command_line_dataset_with_resolution_parses():
    config = parse_train_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--resolution",
                               "1024"])
    assert config.train_data_dir == "d" and config.resolution == (1024, 1024)


@pytest.mark.parametrize("argv, start", [
    (["--cache_text_encoder_outputs"], "training the U-Net only: "),
    (["--clip_skip", "2"], "--clip_skip 2 does not change SDXL training"),
    (["--zero_terminal_snr"], "--zero_terminal_snr without --v_parameterization"),
    (["--train_data_dir", "d", "--in_json", "m.json"], "--dataset_config is given, so --train_data_dir, --in_json "
                                                       "are ignored"),
])
def test_adjustments_are_one_warning_line(caplog, argv, start):
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        parse_train_args(BASE + argv)
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(start) and "\n" not in warnings[0]
    assert all(record.name.startswith("lorakit.") for record in caplog.records)


def test_explicit_unet_only_with_text_encoder_cache_is_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        config = parse_train_args(BASE + ["--cache_text_encoder_outputs", "--network_train_unet_only"])
    assert config.network_train_unet_only and not caplog.records
