"""Training logs from a real run of the tiny model: the TensorBoard event file has sd-scripts' keys at the
global steps, `loss/current` is each step's loss, `loss/average` the moving average of the micro-batch losses over
an epoch's worth of batches, `lr/<group>` the scheduler's rate of each optimizer group; max-norm keys come with
--scale_weight_norms; the loss/LR curve PNG is written even without --logging_dir. Sample images during training
(from the parked VAE and text encoders) leave the training bit-identical."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorakit.config import parse_train_args
from lorakit.testing.datasets import write_dataset_toml, write_image_folder
from lorakit.train.trainer import train

RUN = ["--max_data_loader_n_workers", "0", "--seed", "5", "--network_dim", "4", "--cache_latents",
       "--output_name", "lora", "--max_train_steps", "4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("logs")
    write_image_folder(folder / "img", 3, ((64, 64),))
    return write_dataset_toml(folder / "dataset.toml", folder / "img", resolution=64)


def scalars(logging_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the one TensorBoard run under `logging_dir`: key -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = logging_dir.glob("*/network_train/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return {key: [(e.step, e.value) for e in accumulator.Scalars(key)] for key in accumulator.Tags()["scalars"]}


def test_event_file_keys_and_values(tiny_single_file, dataset, tmp_path):
    """Text encoders and U-Net trained with their own rates; 3 batches per epoch, accumulation 2."""
    argv = ["--pretrained_model_name_or_path", str(tiny_single_file), "--dataset_config", str(dataset),
            "--output_dir", str(tmp_path / "out"), "--logging_dir", str(tmp_path / "logs"), *RUN,
            "--unet_lr", "1e-3", "--text_encoder_lr", "5e-4", "--lr_scheduler", "linear",
            "--gradient_accumulation_steps", "2", "--scale_weight_norms", "1.0"]
    result = train(parse_train_args(argv))
    logged = scalars(tmp_path / "logs")

    assert sorted(logged) == ["loss/average", "loss/current", "loss/epoch_average", "lr/textencoder1",
                              "lr/textencoder2", "lr/unet", "max_norm/keys_scaled", "max_norm/max_key_norm",
                              "norm/avg_key_norm"]
    assert [s for s, _ in logged["loss/current"]] == [1, 2, 3, 4]
    assert [v for _, v in logged["loss/current"]] == pytest.approx(result.losses, rel=1e-6)
    # 2 steps per epoch (batches 1-2, then 3 alone); linear decay from the group's rate over 4 steps.
    assert [s for s, _ in logged["loss/epoch_average"]] == [2, 4]
    for key, lr in (("lr/unet", 1e-3), ("lr/textencoder1", 5e-4), ("lr/textencoder2", 5e-4)):
        assert [v for _, v in logged[key]] == pytest.approx([lr * (4 - k) / 4 for k in (1, 2, 3, 4)], rel=1e-5)
    # The moving average covers the last 3 micro-batch losses (an epoch's worth): at each epoch's end it is
    # exactly that epoch's average.
    averages = dict(logged["loss/average"])
    assert all(math.isfinite(a) for a in averages.values())
    for step, epoch_average in logged["loss/epoch_average"]:
        assert averages[step] == pytest.approx(epoch_average, rel=1e-6)
    assert averages[1] != averages[2]
    assert all(0 <= v for _, v in logged["max_norm/keys_scaled"])
    assert Image.open(tmp_path / "out" / "lora_curves.png").size == (1000, 760)


def test_curves_png_without_logging_dir(tiny_single_file, dataset, tmp_path):
    argv = ["--pretrained_model_name_or_path", str(tiny_single_file), "--dataset_config", str(dataset),
            "--output_dir", str(tmp_path), *RUN, "--network_train_unet_only", "--max_train_steps", "2"]
    train(parse_train_args(argv))
    assert (tmp_path / "lora_curves.png").is_file()
    assert not list(tmp_path.glob("**/events.out.tfevents.*"))


def test_sampling_points_write_files_and_leave_training_unchanged(tiny_single_file, dataset, tmp_path):
    """Sample at first and every step from parked (cached-away) VAE and text encoders: the final LoRA is
    bit-identical to the run without sampling, and each point writes its images and a contact sheet."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 11\nlkt style, a square --n blurry --w 64 --h 96 --s 1\n")
    common = ["--pretrained_model_name_or_path", str(tiny_single_file), "--dataset_config", str(dataset), *RUN,
              "--network_train_unet_only", "--cache_text_encoder_outputs", "--max_train_steps", "2",
              "--network_dropout", "0.1"]
    train(parse_train_args([*common, "--output_dir", str(tmp_path / "plain")]))
    train(parse_train_args([*common, "--output_dir", str(tmp_path / "sampled"), "--sample_prompts", str(prompts),
                            "--sample_at_first", "--sample_every_n_steps", "1", "--sample_sampler", "euler_a"]))

    plain = load_file(tmp_path / "plain" / "lora.safetensors")
    sampled = load_file(tmp_path / "sampled" / "lora.safetensors")
    assert all(torch.equal(plain[key], sampled[key]) for key in plain)
    names = sorted(p.name for p in (tmp_path / "sampled" / "sample").iterdir())
    for tag in ("000000", "000001", "000002"):
        points = [n for n in names if n.startswith(f"lora_{tag}_")]
        assert len([n for n in points if n.endswith("_contact.png")]) == 1
        assert len([n for n in points if n.startswith(f"lora_{tag}_00_") and n.endswith("_11.png")]) == 1
        assert len([n for n in points if n.startswith(f"lora_{tag}_01_")]) == 1
    (second,) = [n for n in names if n.startswith("lora_000001_01_")]
    assert Image.open(tmp_path / "sampled" / "sample" / second).size == (64, 96)


def test_samples_with_ema_use_the_average(tiny_single_file, dataset, tmp_path):
    """--sample_with_ema: while the average equals the weights (warm-up) the samples are those of the weights;
    once it differs they differ, and training is untouched either way."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 11\n")
    common = ["--pretrained_model_name_or_path", str(tiny_single_file), "--dataset_config", str(dataset), *RUN,
              "--network_train_unet_only", "--cache_text_encoder_outputs", "--max_train_steps", "2",
              "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--ema_decay", "0.5"]
    runs = {"plain": [], "warm-up": ["--sample_with_ema", "--ema_update_after_step", "2"],
            "average": ["--sample_with_ema", "--ema_on_cpu"]}
    for name, words in runs.items():
        train(parse_train_args([*common, *words, "--output_dir", str(tmp_path / name)]))

    def sample(name: str) -> bytes:
        (path,) = (tmp_path / name / "sample").glob("lora_000002_00_*_11.png")
        return np.asarray(Image.open(path)).tobytes()

    assert sample("warm-up") == sample("plain") != sample("average")
    loras = [load_file(tmp_path / name / "lora.safetensors") for name in runs]
    assert all(torch.equal(loras[0][key], other[key]) for other in loras[1:] for key in loras[0])
