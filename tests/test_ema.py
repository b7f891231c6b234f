"""--ema_decay: the EMA files of a run equal the average computed here by hand from the LoRA files of each step,
resuming with EMA is bit-identical, rotation takes the EMA files along, the average is swapped in and out for
samples, and the EMA flags need --ema_decay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.config import parse_train_args
from lorakit.errors import LorakitError
from lorakit.testing.datasets import write_dataset_toml, write_image_folder
from lorakit.train.ema import WeightAverage
from lorakit.train.outputs import OutputNames, prune
from lorakit.train.trainer import train

DECAY = 0.8
RUN = ["--max_data_loader_n_workers", "0", "--seed", "3", "--network_dim", "4", "--network_alpha", "4",
       "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs", "--learning_rate", "1e-2",
       "--optimizer_type", "AdamW", "--output_name", "lora", "--ema_decay", str(DECAY)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ema-data")
    write_image_folder(folder / "img", 3, ((64, 64),))
    return write_dataset_toml(folder / "dataset.toml", folder / "img", resolution=64)


def run(model: Path, dataset: Path, output: Path, *args: str):
    return train(parse_train_args(["--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset),
                                   "--output_dir", str(output), *RUN, *args]))


def test_ema_files_equal_the_average_of_each_steps_weights(tiny_single_file, dataset, tmp_path):
    after, steps = 1, 5
    run(tiny_single_file, dataset, tmp_path, "--max_train_steps", str(steps), "--save_every_n_steps", "1",
        "--ema_update_after_step", str(after), "--ema_update_every", "2")
    weights = {step: load_file(tmp_path / f"lora-step{step:08d}.safetensors") for step in range(1, steps)}
    weights[steps] = load_file(tmp_path / "lora.safetensors")
    average = {key: value.double() for key, value in weights[1].items()}  # step 1 ≤ after: the weights
    for step in range(2, steps + 1):
        if step <= after:
            average = {key: value.double() for key, value in weights[step].items()}
        elif (step - after) % 2 == 0:  # steps 3 and 5
            average = {key: DECAY * average[key] + (1 - DECAY) * weights[step][key].double() for key in average}
        name = f"lora-step{step:08d}-ema.safetensors" if step < steps else "lora-ema.safetensors"
        saved = load_file(tmp_path / name)
        assert saved.keys() == average.keys()
        assert all((saved[key].double() - average[key]).abs().max() < 1e-6 for key in average), step
    final = load_file(tmp_path / "lora-ema.safetensors")
    trained = [key for key in final if key.endswith("lora_up.weight")]
    assert any(not torch.equal(final[key], weights[steps][key]) for key in trained)  # the average is not the weights


def test_resume_with_ema_is_bit_identical(tiny_single_file, dataset, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(tiny_single_file, dataset, whole, "--max_train_steps", "5", "--save_every_n_steps", "3", "--save_state")
    state = whole / "lora-step00000003-state"
    assert (state / "ema.safetensors").is_file()
    run(tiny_single_file, dataset, resumed, "--max_train_steps", "5", "--resume", str(state))
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        expected, got = load_file(whole / name), load_file(resumed / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name


def test_rotation_removes_a_files_ema_too(tmp_path):
    names = OutputNames(tmp_path, "lora")
    for step in (1, 2):
        for path in (names.step_file(step), names.ema_file(names.step_file(step))):
            path.write_bytes(b"x")
    assert names.step_files() == {1: names.step_file(1), 2: names.step_file(2)}  # EMA files are not step files
    prune(names.step_files(), 1, names, with_states=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lora-step00000002-ema.safetensors",
                                                                "lora-step00000002.safetensors"]


def test_the_average_is_in_place_only_for_the_duration():
    layer = nn.Linear(3, 2)
    average = WeightAverage(layer, 0.5)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    average.update(1)  # 0.5 · original + 0.5 · (original + 1)
    trained = layer.weight.detach().clone()
    with average.in_place():
        assert torch.allclose(layer.weight, original + 0.5)
    assert torch.equal(layer.weight, trained)


@pytest.mark.parametrize("flag", [["--sample_with_ema"], ["--ema_on_cpu"], ["--ema_update_every", "2"],
                                  ["--ema_update_after_step", "10"]])
def test_ema_flags_need_ema_decay(flag):
    with pytest.raises(LorakitError, match=f"{flag[0]} needs --ema_decay"):
        parse_train_args(["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "x",
                          "--resolution", "64", *flag])


@pytest.mark.parametrize("words, message", [
    (["--sample_with_ema"], "--sample_with_ema needs --sample_prompts"),
    (["--optimizer_type", "AdamWScheduleFree"], "--ema_decay with AdamWScheduleFree: a schedule-free optimizer"),
])
def test_ema_combinations_that_cannot_work_are_refused(words, message):
    with pytest.raises(LorakitError, match=message):
        parse_train_args(["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "x",
                          "--resolution", "64", "--ema_decay", "0.9", *words])


@pytest.mark.parametrize("decay", ["1", "0", "nan", "1.5"])
def test_ema_decay_is_between_0_and_1(decay):
    with pytest.raises(LorakitError, match="--ema_decay"):
        parse_train_args(["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "x",
                          "--resolution", "64", "--ema_decay", decay])
