"""Validation loss (sd-scripts' `train_network.py` validation block): fixed timesteps, its own seeded generator,
global RNG put back, network mode restored; in a real run of the tiny model it is deterministic across runs and
leaves training bit-identical."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import parse_train_args
from lorakit.testing.datasets import write_dataset_toml, write_image_folder
from lorakit.train.loss import LossOptions
from lorakit.train.noise import NoiseOptions, noise_schedule
from lorakit.train.step import StepOptions
from lorakit.train.trainer import train
from lorakit.train.validation import should_validate, validation_loss, validation_timesteps

OPTIONS = StepOptions(noise_schedule(), NoiseOptions(), LossOptions())


def test_timesteps_are_the_inner_points_of_six():
    assert validation_timesteps(0, 1000) == [200, 400, 600, 800]
    assert validation_timesteps(100, 600) == [200, 300, 400, 500]


def test_cadence():
    assert should_validate("step", global_step=4, epoch=1, every_n_steps=2, every_n_epochs=None)
    assert not should_validate("step", global_step=3, epoch=1, every_n_steps=2, every_n_epochs=None)
    assert not should_validate("step", global_step=3, epoch=1, every_n_steps=None, every_n_epochs=None)
    assert should_validate("epoch", global_step=3, epoch=1, every_n_steps=None, every_n_epochs=None)
    assert not should_validate("epoch", global_step=3, epoch=3, every_n_steps=None, every_n_epochs=2)


def test_fixed_timesteps_own_generator_rng_and_mode_restored():
    seen = []

    def loss_of(batch, options, generator):
        seen.append((batch, options.noise.min_timestep, options.noise.max_timestep))
        return torch.rand((), generator=generator) + torch.rand(()) + random.random() + np.random.rand()

    network = torch.nn.Dropout(0.5).train()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    before = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    first = validation_loss(["a", "b", "c"], loss_of, OPTIONS, [200, 400], seed=9, network=network,
                            max_batches=2)
    after = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    assert network.training
    assert seen == [("a", 200, 200), ("a", 400, 400), ("b", 200, 200), ("b", 400, 400)]
    assert first[1] == 4
    assert validation_loss(["a", "b"], loss_of, OPTIONS, [200, 400], seed=9, network=network) == first


@pytest.fixture(scope="module")
def run(tiny_single_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("validation")
    write_image_folder(folder / "img", 6)
    dataset = write_dataset_toml(folder / "dataset.toml", folder / "img", resolution=96,
                                 extra_subset="  shuffle_caption = true\n")

    def run(output: Path, *args: str) -> Path:
        argv = ["--pretrained_model_name_or_path", str(tiny_single_file), "--dataset_config", str(dataset),
                "--output_dir", str(output), "--logging_dir", str(output / "logs"), "--output_name", "lora",
                "--max_data_loader_n_workers", "0", "--seed", "4", "--network_dim", "4", "--network_dropout", "0.2",
                "--network_train_unet_only", "--cache_latents", "--learning_rate", "1e-3", "--max_train_steps", "4",
                "--validation_split", "0.34", *args]
        train(parse_train_args(argv))
        return output

    return run


def validation_scalars(output: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (output / "logs").glob("*/network_train/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return {key: [(e.step, e.value) for e in accumulator.Scalars(key)]
            for key in accumulator.Tags()["scalars"] if key.startswith("loss/validation/")}


def test_validation_is_deterministic_and_leaves_training_unchanged(run, tmp_path):
    """LoRA dropout on (it draws from torch's global RNG): validating every step changes nothing in training."""
    first = run(tmp_path / "a", "--validate_every_n_steps", "1")
    again = run(tmp_path / "b", "--validate_every_n_steps", "1")
    epochs_only = run(tmp_path / "c")

    logged = validation_scalars(first)
    assert sorted(logged) == ["loss/validation/epoch_average", "loss/validation/epoch_divergence",
                              "loss/validation/step_average", "loss/validation/step_divergence"]
    assert [s for s, _ in logged["loss/validation/step_average"]] == [1, 2, 3, 4]
    assert logged == validation_scalars(again)
    assert logged["loss/validation/epoch_average"] == validation_scalars(epochs_only)["loss/validation/epoch_average"]
    values = [v for _, v in logged["loss/validation/step_average"]]
    assert len(set(values)) == len(values)  # the weights change, so does the loss

    final = load_file(first / "lora.safetensors")
    for other in (again, epochs_only):
        weights = load_file(other / "lora.safetensors")
        assert all(torch.equal(final[key], weights[key]) for key in final)
