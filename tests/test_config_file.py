"""`--config_file` (TOML of arguments) and `--output_config`: precedence, conversion, warnings, round trip."""

from __future__ import annotations

import dataclasses
import logging
import sys

import pytest

from lorakit.config import parse_train_args, read_config_file
from lorakit.errors import LorakitError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

BASE = ["--pretrained_model_name_or_path", "model.safetensors", "--dataset_config", "data.toml"]


def write(tmp_path, text, name="args.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def warnings_of(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def test_command_line_wins_over_file_which_wins_over_defaults(tmp_path):
    path = write(tmp_path, """
        [model_arguments]
        pretrained_model_name_or_path = "from_file.safetensors"
        [training]
        dataset_config = "data.toml"
        learning_rate = 3e-4
        max_train_steps = 500
        network_dim = 16
    """)
    config = parse_train_args(["--config_file", str(path), "--network_dim", "8", "--max_train_steps", "1600"])
    assert config.pretrained_model_name_or_path == "from_file.safetensors"
    assert config.learning_rate == 3e-4  # file
    assert config.network_dim == 8  # command line
    assert config.max_train_steps == 1600  # command line, although it equals the default
    assert config.train_batch_size == 1  # default


def test_toml_suffix_is_appended(tmp_path):
    write(tmp_path, 'pretrained_model_name_or_path = "m"\ndataset_config = "d"\nseed = 7\n')
    assert parse_train_args(["--config_file", str(tmp_path / "args")]).seed == 7


@pytest.mark.parametrize("toml, name, expected", [
    ("resolution = 1024", "resolution", (1024, 1024)),
    ('resolution = "1024,768"', "resolution", (1024, 768)),
    ("resolution = [1024, 768]", "resolution", (1024, 768)),
    ("lr_warmup_steps = 0.1", "lr_warmup_steps", 0.1),
    ('lr_warmup_steps = "5%"', "lr_warmup_steps", 0.05),
    ("lr_warmup_steps = 100", "lr_warmup_steps", 100),
    ("lr_warmup_steps = 100.0", "lr_warmup_steps", 100),
    ("learning_rate = 1", "learning_rate", 1.0),
    ('network_dim = "8"', "network_dim", 8),
    ('network_args = ["conv_dim=4", "conv_alpha=1"]', "network_args", ("conv_dim=4", "conv_alpha=1")),
    ('network_args = "conv_dim=4"', "network_args", ("conv_dim=4",)),
    ("text_encoder_lr = [1e-5, 2e-5]", "text_encoder_lr", (1e-5, 2e-5)),
    ("max_token_length = 225", "max_token_length", 225),
    ("flip_aug = true", "flip_aug", True),
    ('face_crop_aug_range = "2,4"', "face_crop_aug_range", (2.0, 4.0)),
])
def test_file_values_go_through_the_command_line_types(tmp_path, toml, name, expected):
    value = read_config_file(write(tmp_path, toml))[name]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("toml, message", [
    ("network_dim = 8.5", "network_dim = 8.5: expected an integer"),
    ("lr_warmup_steps = 1.5",
     "lr_warmup_steps = 1.5: expected an integer step count, a ratio below 1 or N%, found '1.5'"),
    ("max_token_length = 100", "max_token_length = 100: expected one of 150, 225"),
    ('mixed_precision = "fp32"', "mixed_precision = 'fp32': expected one of no, fp16, bf16"),
    ('flip_aug = "yes"', "flip_aug = 'yes': expected true or false"),
    ("network_dim = true", "network_dim = True: expected an integer, found bool"),
    ('resolution = "big"', "resolution = 'big': expected SIZE or WIDTH,HEIGHT in pixels, found 'big'"),
    ("learning_rate = [1, 2]", "learning_rate = [1, 2]: expected a number, found list"),
])
def test_bad_file_values_name_the_file_and_key(tmp_path, toml, message):
    path = write(tmp_path, toml)
    with pytest.raises(LorakitError) as error:
        read_config_file(path)
    assert str(error.value) == f"config file {path}: {message}"


def test_unknown_keys_are_warned_by_name_one_line_each(tmp_path, caplog):
    path = write(tmp_path, """
        lerning_rate = 1e-4
        [extra]
        frobnicate = 1
        config_file = "other"
    """)
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        values = read_config_file(path)
    assert values == {}
    assert warnings_of(caplog) == [
        f"config file {path}: unknown key 'lerning_rate' ignored (did you mean learning_rate?)",
        f"config file {path}: unknown key 'frobnicate' ignored",
        f"config file {path}: key 'config_file' is only read from the command line; ignored",
    ]


def test_missing_and_malformed_files_are_one_line_errors(tmp_path):
    with pytest.raises(LorakitError, match=r"^--config_file .*nothere.toml: no such file$"):
        parse_train_args(["--config_file", str(tmp_path / "nothere")])
    path = write(tmp_path, "learning_rate = = 1")
    with pytest.raises(LorakitError, match=r"^--config_file .*args.toml: invalid TOML: "):
        parse_train_args(["--config_file", str(path)])


def test_refused_flags_in_a_file_are_refused(tmp_path):
    path = write(tmp_path, 'pretrained_model_name_or_path = "m"\ndataset_config = "d"\nlowram = true\n')
    with pytest.raises(LorakitError, match=r"^not supported yet: --lowram \("):
        parse_train_args(["--config_file", str(path)])


def test_a_file_switch_stays_on_and_a_false_switch_is_off(tmp_path):
    path = write(tmp_path, 'pretrained_model_name_or_path = "m"\ndataset_config = "d"\nflip_aug = true\n'
                 "cache_latents = false\n")
    config = parse_train_args(["--config_file", str(path)])
    assert config.flip_aug and not config.cache_latents


ROUND_TRIP = BASE + [
    "--resolution", "1024,768", "--network_args", "conv_dim=4", "conv_alpha=1", "--lr_warmup_steps", "10%",
    "--lr_scheduler", "cosine", "--network_alpha", "16", "--text_encoder_lr", "1e-5", "2e-5", "--flip_aug",
    "--optimizer_type", "Prodigy",
    "--wandb_api_key", "secret", "--caption_extention", "txt", "--sample_every_n_steps", "0",
]


def test_output_config_round_trip(tmp_path, capsys):
    target = tmp_path / "saved"
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(ROUND_TRIP + ["--config_file", str(target), "--output_config"])
    assert exit_info.value.code == 0
    assert "saved.toml" in capsys.readouterr().out
    saved = tomllib.loads((tmp_path / "saved.toml").read_text())
    assert saved["resolution"] == "1024,768"  # the form sd-scripts reads back too
    assert saved["lr_warmup_steps"] == 0.1 and saved["network_alpha"] == 16.0
    assert saved["network_args"] == ["conv_dim=4", "conv_alpha=1"]
    assert "wandb_api_key" not in saved and "output_config" not in saved and "config_file" not in saved
    assert "learning_rate" not in saved  # defaults are not written
    reread = parse_train_args(["--config_file", str(target)])
    assert dataclasses.replace(reread, config_file=None) == parse_train_args(ROUND_TRIP[:-6] + ROUND_TRIP[-4:])
    assert not list(tmp_path.glob(".*tmp*"))


def test_output_config_never_overwrites(tmp_path):
    path = write(tmp_path, "seed = 1\n")
    with pytest.raises(LorakitError, match=r"^--output_config: .*args.toml exists already"):
        parse_train_args(BASE + ["--config_file", str(path), "--output_config"])
    assert path.read_text() == "seed = 1\n"


def test_output_config_needs_a_config_file():
    with pytest.raises(LorakitError, match="^--output_config needs --config_file"):
        parse_train_args(BASE + ["--output_config"])
