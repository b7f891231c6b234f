"""The flag table: complete against sd-scripts' parser, documented, grouped, and every flag either accepted into
TrainConfig or refused with its one line."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.config import TrainConfig, build_parser, config_to_metadata, iter_flags, parse_train_args
from lorakit.config.docs import render_markdown
from lorakit.config.flags import Flag, float_range, number
from lorakit.config.train_config import GROUPS
from lorakit.errors import LorakitError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FLAGS = [line.strip() for line in (ROOT / "tests/data/reference_flags.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
BASE = ["--pretrained_model_name_or_path", "model.safetensors", "--dataset_config", "data.toml"]
FLAGS = {flag.name: flag for flag in iter_flags()}

DESIGN_COMMAND = """
--pretrained_model_name_or_path=sd_xl_base_1.0.safetensors --dataset_config=my_sdxl_dataset_config.toml
--output_dir=out --output_name=my_sdxl_lora --save_model_as=safetensors
--network_module=networks.lora --network_dim=32 --network_alpha=16
--learning_rate=1e-4 --unet_lr=1e-4 --text_encoder_lr1=1e-5 --text_encoder_lr2=1e-5
--optimizer_type=AdamW8bit --lr_scheduler=constant --max_train_epochs=10 --save_every_n_epochs=1
--mixed_precision=bf16 --gradient_checkpointing --cache_text_encoder_outputs --cache_latents
""".split()


def test_every_reference_flag_is_in_the_table_and_only_lorakits_own_are_added():
    assert len(REFERENCE_FLAGS) == len(set(REFERENCE_FLAGS)) == 196
    options = {flag.option: flag for flag in iter_flags()}
    assert [name for name in REFERENCE_FLAGS if name not in options] == []
    assert all(options[name].kohya for name in REFERENCE_FLAGS)
    added = {flag.option for flag in iter_flags() if not flag.kohya}
    assert added == {"--text_encoder_lr1", "--text_encoder_lr2", "--dry_run", "--model_family", "--events_log",
                     "--ema_decay", "--ema_update_after_step", "--ema_update_every", "--ema_on_cpu",
                     "--sample_with_ema", "--gradient_checkpointing_blocks", "--memory_budget_gb"}
    assert set(options) == set(REFERENCE_FLAGS) | added


def test_table_is_the_dataclass_and_every_flag_is_documented_and_grouped():
    assert [field.name for field in dataclasses.fields(TrainConfig)] == list(FLAGS)
    for flag in iter_flags():
        assert len(flag.help) > 10 and "\n" not in flag.help, flag.name
        assert flag.group in GROUPS, flag.name
        assert flag.refused is None or (flag.refused and "\n" not in flag.refused), flag.name
        if flag.choices and flag.default is not None:
            assert flag.default in flag.choices, flag.name
    assert {flag.group for flag in iter_flags()} == set(GROUPS)


# Defaults of sd-scripts' argparse (`train_network.py` `setup_parser`), as it writes them (str() goes into metadata).
REFERENCE_DEFAULTS = {
    "mixed_precision": "no", "dynamo_backend": "inductor", "dataset_repeats": 1, "train_batch_size": 1,
    "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64, "caption_extension": ".caption",
    "caption_separator": ",", "keep_tokens": 0, "keep_tokens_separator": "", "caption_dropout_rate": 0.0,
    "token_warmup_min": 1, "prior_loss_weight": 1.0, "vae_batch_size": 1, "network_alpha": 1,
    "optimizer_type": "", "learning_rate": 2e-6, "max_grad_norm": 1.0, "lr_scheduler": "constant",
    "lr_warmup_steps": 0, "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_scheduler_type": "",
    "max_train_steps": 1600, "gradient_accumulation_steps": 1, "max_data_loader_n_workers": 8,
    "multires_noise_discount": 0.3, "loss_type": "l2", "huber_schedule": "snr", "huber_c": 0.1,
    "huber_scale": 1.0, "save_model_as": "safetensors", "sample_sampler": "ddim", "validation_split": 0.0,
    "zero_stage": 2, "network_dim": None, "seed": None, "text_encoder_lr": None, "resolution": None,
}


@pytest.mark.parametrize("name, default", sorted(REFERENCE_DEFAULTS.items()))
def test_defaults_match_the_reference(name, default):
    assert FLAGS[name].default == default
    assert type(FLAGS[name].default) is type(default)


def test_parser_defaults_are_the_table_defaults():
    namespace = build_parser().parse_args([])
    assert vars(namespace) == {flag.name: flag.default for flag in iter_flags()}


def test_help_is_grouped_in_table_order_and_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    positions = [text.index(f"\n{group.title}:\n") for group in GROUPS]
    assert positions == sorted(positions)
    for flag in iter_flags():
        section = next(i for i, group in enumerate(GROUPS) if group == flag.group)
        position = text.index(f"  {flag.option} " if not flag.is_switch else f"  {flag.option}")
        assert positions[section] < position, flag.name
        if section + 1 < len(positions):
            assert position < positions[section + 1], flag.name
    words = " ".join(text.split())
    assert ("--v2 [not for --model_family sdxl: SDXL has no v2: train_network.py (--model_family sd1/sd2) trains "
            "SD 2.x]") in words
    assert "--enable_bucket [not supported yet" not in words
    assert "--lr_warmup_steps N|RATIO|N% warm-up steps" in words  # '%' survives argparse's %-formatting


def test_docs_page_is_generated_from_the_table():
    committed = (ROOT / "docs/flags.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), "run: PYTHONPATH=src python -m lorakit.config.docs"
    for flag in iter_flags():
        assert f"| `{flag.option}` |" in committed


def test_design_example_command_parses_to_typed_values(caplog):
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        config = parse_train_args(DESIGN_COMMAND)
    assert config.network_dim == 32 and isinstance(config.network_dim, int)
    assert config.network_alpha == 16.0 and isinstance(config.network_alpha, float)
    assert (config.learning_rate, config.unet_lr) == (1e-4, 1e-4)
    assert (config.text_encoder_lr1, config.text_encoder_lr2, config.text_encoder_lr) == (1e-5, 1e-5, None)
    assert config.optimizer_type == "AdamW8bit" and config.lr_scheduler == "constant"
    assert (config.max_train_epochs, config.save_every_n_epochs) == (10, 1)
    assert config.mixed_precision == "bf16" and config.gradient_checkpointing
    assert config.cache_latents and config.cache_text_encoder_outputs
    assert config.network_train_unet_only  # the DESIGN.md decision, said in one warning line
    assert config.save_model_as == "safetensors" and config.output_name == "my_sdxl_lora"
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("training the U-Net only: ")
    assert "\n" not in warnings[0]


@pytest.mark.parametrize("argv, expected", [
    (["--text_encoder_lr", "3e-5"], (3e-5, 3e-5)),
    (["--text_encoder_lr", "3e-5", "2e-5"], (3e-5, 2e-5)),
    (["--text_encoder_lr", "3e-5", "2e-5", "--text_encoder_lr2", "1e-6"], (3e-5, 1e-6)),
    (["--text_encoder_lr1", "4e-6", "--text_encoder_lr", "3e-5"], (4e-6, 3e-5)),
    (["--text_encoder_lr"], (None, None)),
    ([], (None, None)),
])
def test_text_encoder_learning_rates(argv, expected):
    config = parse_train_args(BASE + argv)
    assert (config.text_encoder_lr1, config.text_encoder_lr2) == expected


def test_three_text_encoder_rates_are_refused():
    with pytest.raises(LorakitError, match=r"^--text_encoder_lr 1e-05 2e-05 3e-05: expected one rate"):
        parse_train_args(BASE + ["--text_encoder_lr", "1e-5", "2e-5", "3e-5"])


def test_unique_prefixes_work_and_ambiguous_or_unknown_flags_are_one_line():
    config = parse_train_args(BASE + ["--learning", "3e-4", "--network_di", "8"])
    assert (config.learning_rate, config.network_dim) == (3e-4, 8)
    with pytest.raises(LorakitError, match="ambiguous option: --network_d could match"):
        parse_train_args(BASE + ["--network_d", "8"])
    suggestion = r"^unrecognized argument --lerning_rate \(did you mean --learning_rate\?\)$"
    with pytest.raises(LorakitError, match=suggestion):
        parse_train_args(BASE + ["--lerning_rate=1e-4"])
    with pytest.raises(LorakitError, match=r"^argument --network_dim: invalid int value: 'x'$"):
        parse_train_args(BASE + ["--network_dim", "x"])


def test_help_of_train_network_marks_what_sd_refuses(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--help"], prog="train_network.py", family="sd1")
    words = " ".join(capsys.readouterr().out.split())
    assert "--v2 Stable Diffusion 2.x model" in words
    assert "--text_encoder_lr1 X [not for --model_family sd1: " in words


def sample_value(flag: Flag) -> list[str]:
    """Command-line words giving `flag` a valid non-default value."""
    if flag.is_switch:
        return [flag.option]
    if flag.choices:
        return [flag.option, str(next(choice for choice in flag.choices if choice != flag.default))]
    word = {int: "96", number: "0.5", str: "some_value", float_range: "1.0,2.0"}.get(flag.parse, "128,64")
    return [flag.option] + [word] * (2 if flag.many else 1)


@pytest.mark.parametrize("flag", [flag for flag in iter_flags() if flag.refused], ids=lambda flag: flag.name)
def test_each_refused_flag_gives_its_one_line(flag):
    with pytest.raises(LorakitError) as error:
        parse_train_args(BASE + sample_value(flag))
    expected = (f"{flag.option} does not apply to --model_family sdxl ({flag.refused})" if flag.families
                else f"not supported yet: {flag.option} ({flag.refused})")
    assert str(error.value) == expected
    assert "\n" not in str(error.value)


def test_refused_flags_at_their_default_are_accepted():
    config = parse_train_args(BASE + ["--zero_stage", "2"])
    assert config.zero_stage == 2


# Flags that need a partner flag to be valid, and those that cannot be given a plain value in this walk.
PARTNERS = {
    "adaptive_noise_scale": ["--noise_offset", "0.03"],
    **{name: ["--ema_decay", "0.99"] for name in ("ema_update_after_step", "ema_update_every", "ema_on_cpu")},
    "sample_with_ema": ["--ema_decay", "0.99", "--sample_prompts", "prompts.txt"],
    "full_fp16": ["--mixed_precision", "fp16"], "full_bf16": ["--mixed_precision", "bf16"],
    "fp8_base": ["--mixed_precision", "bf16"], "fp8_base_unet": ["--mixed_precision", "bf16"],
    "scale_v_pred_loss_like_noise_pred": ["--v_parameterization"],
    "dim_from_weights": ["--network_weights", "w.safetensors"],
    "base_weights_multiplier": ["--base_weights", "a.safetensors", "b.safetensors"],
    "lr_warmup_steps": ["--lr_scheduler", "constant_with_warmup"],
    "max_bucket_reso": ["--min_bucket_reso", "64"], "memory_budget_gb": ["--gradient_checkpointing"],
    "gradient_checkpointing_blocks": ["--gradient_checkpointing"],
}
SPECIAL = {
    "output_config": None, "config_file": None,  # tested in test_config_file.py
    "pretrained_model_name_or_path": None, "dataset_config": None,  # in BASE
    "lr_scheduler": ["--lr_scheduler", "cosine"],
    "max_timestep": ["--max_timestep", "900"], "min_timestep": ["--min_timestep", "100"],
    "validation_split": ["--validation_split", "0.25"],
    "lr_decay_steps": ["--lr_decay_steps", "10%"], "lr_warmup_steps": ["--lr_warmup_steps", "0.1"],
    "resolution": ["--resolution", "1024,768"], "face_crop_aug_range": ["--face_crop_aug_range", "2.0,4.0"],
}


@pytest.mark.parametrize("flag", [flag for flag in iter_flags() if flag.implemented
                                  and SPECIAL.get(flag.name, ...) is not None], ids=lambda flag: flag.name)
def test_each_implemented_flag_reaches_the_config(flag):
    words = SPECIAL.get(flag.name) or sample_value(flag)
    config = parse_train_args(BASE + PARTNERS.get(flag.name, []) + words)
    assert getattr(config, flag.name) != flag.default


def test_metadata_strings_are_what_sd_scripts_writes():
    config = parse_train_args(DESIGN_COMMAND + ["--resolution", "1024", "--network_args", "conv_dim=4",
                                                "--wandb_api_key", "secret"])
    metadata = config_to_metadata(config)
    assert metadata["network_alpha"] == "16.0"
    assert metadata["network_dim"] == "32"
    assert metadata["learning_rate"] == "0.0001"
    assert metadata["resolution"] == "(1024, 1024)"
    assert metadata["network_args"] == "['conv_dim=4']"
    assert metadata["gradient_checkpointing"] == "True" and metadata["full_fp16"] == "False"
    assert metadata["seed"] == "None" and metadata["max_train_steps"] == "1600"
    assert "wandb_api_key" not in metadata and "huggingface_token" not in metadata
    assert all(isinstance(value, str) for value in metadata.values())


def test_importing_the_config_does_not_import_torch():
    code = "import sys, lorakit.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src")})
