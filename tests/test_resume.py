"""States and --resume on the tiny random SDXL model (CPU, fp32): a run resumed from a mid-epoch state ends with
LoRA tensors bit-identical to the uninterrupted run (buckets in three aspect ratios, caption shuffling with live
text encoders, gradient accumulation 2, a warm-up + cosine schedule); the state's files; incomplete folders are
refused; --initial_step counts absolute steps; the state encoding round-trips optimizer states (8-bit too)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import parse_train_args
from lorakit.errors import LorakitError
from lorakit.testing.datasets import write_dataset_toml, write_image_folder
from lorakit.train.state import MARKER, decode, encode, read_state
from lorakit.train.trainer import train

# 6 images in 3 aspect ratios, batch size 1, accumulation 2: 3 optimizer steps per epoch. The state is saved at
# step 4 (second batch pair of epoch 2, mid-epoch) and the run ends at step 5, also mid-epoch.
RUN = ["--max_data_loader_n_workers", "0", "--seed", "7", "--network_dim", "4", "--network_alpha", "4",
       "--network_train_unet_only", "--cache_latents", "--gradient_accumulation_steps", "2",
       "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--max_train_steps", "5",
       "--save_every_n_steps", "4", "--save_state", "--output_name", "lora"]


@pytest.fixture(scope="module")
def shuffled_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shuffled")
    write_image_folder(folder / "img", 6)  # 96x96, 128x80, 80x128
    return write_dataset_toml(folder / "dataset.toml", folder / "img", resolution=96,
                              extra_subset="  shuffle_caption = true\n  keep_tokens = 1\n")


def run(model: Path, dataset: Path, output: Path, *args: str):
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset),
            "--output_dir", str(output), *RUN, *args]
    return train(parse_train_args(argv))


@pytest.fixture(scope="module")
def uninterrupted(tiny_single_file, shuffled_dataset, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    result = run(tiny_single_file, shuffled_dataset, output, "--save_every_n_epochs", "1")
    assert result.global_step == 5
    return output


def test_resume_from_a_mid_epoch_state_is_bit_identical(tiny_single_file, shuffled_dataset, uninterrupted,
                                                        tmp_path):
    state = uninterrupted / "lora-step00000004-state"
    progress = json.loads((state / "progress.json").read_text())
    assert (progress["global_step"], progress["epoch"], progress["batches_done"]) == (4, 2, 2)
    assert not progress["epoch_finished"]

    result = run(tiny_single_file, shuffled_dataset, tmp_path, "--resume", str(state))

    assert result.global_step == 5 and len(result.losses) == 1  # one step left, counted absolutely
    expected, resumed = load_file(uninterrupted / "lora.safetensors"), load_file(tmp_path / "lora.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    at_state = load_file(uninterrupted / "lora-step00000004.safetensors")
    assert any(not torch.equal(at_state[key], resumed[key]) for key in at_state)  # the resumed step did train
    assert json.loads((tmp_path / "lora-state" / "train_state.json").read_text()) == {
        "current_epoch": 2, "current_step": 5}


def test_resume_from_an_epoch_end_state_is_bit_identical(tiny_single_file, shuffled_dataset, uninterrupted,
                                                          tmp_path):
    state = uninterrupted / "lora-000001-state"
    progress = json.loads((state / "progress.json").read_text())
    assert (progress["global_step"], progress["epoch"], progress["epoch_finished"]) == (3, 1, True)
    result = run(tiny_single_file, shuffled_dataset, tmp_path, "--resume", str(state), "--save_every_n_epochs", "1")
    assert result.global_step == 5 and len(result.losses) == 2
    assert not (tmp_path / "lora-000001.safetensors").exists()  # epoch 1 is not redone
    expected, resumed = load_file(uninterrupted / "lora.safetensors"), load_file(tmp_path / "lora.safetensors")
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_state_rotation_keeps_its_own_count(tiny_single_file, shuffled_dataset, tmp_path):
    """--save_last_n_steps_state rotates states on their own; --save_last_n_steps keeps the LoRA files."""
    run(tiny_single_file, shuffled_dataset, tmp_path, "--save_every_n_steps", "1", "--save_last_n_steps", "10",
        "--save_last_n_steps_state", "1")
    assert sorted(p.name for p in tmp_path.glob("lora-step*.safetensors")) == [
        f"lora-step{s:08d}.safetensors" for s in (1, 2, 3, 4)]
    assert sorted(p.name for p in tmp_path.glob("lora-step*-state")) == [
        "lora-step00000003-state", "lora-step00000004-state"]


def test_state_folder_holds_every_part_and_no_pickle(uninterrupted):
    state = uninterrupted / "lora-step00000004-state"
    assert sorted(p.name for p in state.iterdir()) == sorted([
        MARKER, "network.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
        "scheduler.safetensors", "rng.json", "progress.json", "train_state.json"])
    assert json.loads((state / "train_state.json").read_text()) == {"current_epoch": 2, "current_step": 4}
    loaded = read_state(state)
    network = load_file(uninterrupted / "lora-step00000004.safetensors")
    assert loaded.network.keys() == network.keys()  # the network's own keys are the LoRA file's
    assert all(torch.equal(loaded.network[k], network[k]) for k in network)
    assert loaded.optimizer["param_groups"][0]["name"] == "unet"
    assert loaded.scheduler["last_epoch"] == 4
    assert set(loaded.rng[0]) == {"python", "numpy", "torch", "cuda"}
    assert not list(state.parent.glob(".*"))  # no temporary left behind
    assert (uninterrupted / "lora-state" / MARKER).is_file()  # final state with --save_state


def test_incomplete_state_is_refused_and_the_last_complete_one_named(uninterrupted, tmp_path):
    complete = tmp_path / "lora-step00000004-state"
    shutil.copytree(uninterrupted / "lora-step00000004-state", complete)
    broken = tmp_path / "lora-step00000006-state"
    shutil.copytree(complete, broken)
    (broken / MARKER).unlink()
    with pytest.raises(LorakitError) as error:
        read_state(broken)
    message = str(error.value)
    assert "\n" not in message and "incomplete" in message and str(complete) in message and "step 4" in message
    with pytest.raises(LorakitError, match="no such folder"):
        read_state(tmp_path / "absent-state")


def test_initial_step_skips_to_the_absolute_step(tiny_single_file, shuffled_dataset, tmp_path):
    """--initial_step 4 --skip_until_initial_step: steps 5.. only; the step file and ss_steps count absolutely."""
    result = run(tiny_single_file, shuffled_dataset, tmp_path, "--initial_step", "4", "--skip_until_initial_step",
                 "--max_train_steps", "6", "--save_every_n_steps", "5", "--save_state", "--lr_scheduler", "constant",
                 "--lr_warmup_steps", "0")
    assert result.global_step == 6 and len(result.losses) == 2
    assert (tmp_path / "lora-step00000005.safetensors").is_file()
    progress = json.loads((tmp_path / "lora-step00000005-state" / "progress.json").read_text())
    assert (progress["global_step"], progress["epoch"], progress["batches_done"]) == (5, 2, 4)


@pytest.mark.parametrize("optimizer", ["AdamW", "AdamW8bit", "Adafactor"])
def test_optimizer_state_round_trips_through_json_and_safetensors(optimizer):
    import bitsandbytes as bnb
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes
    from transformers.optimization import Adafactor

    make = {"AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3),
            "AdamW8bit": lambda p: bnb.optim.AdamW8bit(p, lr=1e-3),
            "Adafactor": lambda p: Adafactor(p, lr=1e-3, relative_step=False, scale_parameter=False)}[optimizer]
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 48))
    first = make([{"params": [param], "name": "unet"}])
    for _ in range(3):
        param.grad = torch.randn_like(param)
        first.step()
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(encode(first.state_dict(), tensors))
    restored = decode(json.loads(text), load_bytes(save_bytes(tensors)))
    twin = torch.nn.Parameter(param.detach().clone())
    second = make([{"params": [twin], "name": "unet"}])
    second.load_state_dict(restored)
    grad = torch.randn_like(param)
    for p, opt in ((param, first), (twin, second)):
        p.grad = grad.clone()
        opt.step()
    assert torch.equal(param, twin)
