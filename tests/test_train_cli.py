"""The training command lines: the DESIGN.md example command runs to the end on CPU through
`accelerate launch ... sdxl_train_network.py`, `lorakit train` / `python -m lorakit train` work, `--help` is grouped,
and bad flags are one line with exit code 2."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.config.train_config import GROUPS
from lorakit.network.io import read_lora
from lorakit.testing.datasets import write_dataset_toml, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_METADATA = set(json.loads((ROOT / "tests/data/sdxl-lora-keys.json").read_text())["metadata"])
TE_CACHING_WARNING = "training the U-Net only: --cache_text_encoder_outputs fixes the text-encoder outputs"

# DESIGN.md's command, changed only in the model path, the dataset TOML and --max_train_epochs (10 -> 2).
DESIGN_COMMAND = """
accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py
--pretrained_model_name_or_path={model} --dataset_config={dataset}
--output_dir={output} --output_name=my_sdxl_lora --save_model_as=safetensors
--network_module=networks.lora --network_dim=32 --network_alpha=16
--learning_rate=1e-4 --unet_lr=1e-4 --text_encoder_lr1=1e-5 --text_encoder_lr2=1e-5
--optimizer_type=AdamW8bit --lr_scheduler=constant --max_train_epochs=2 --save_every_n_epochs=1
--mixed_precision=bf16 --gradient_checkpointing --cache_text_encoder_outputs --cache_latents
"""


def environment() -> dict[str, str]:
    paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def command(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_buckets(tmp_path_factory) -> Path:
    """A DreamBooth-style dataset TOML (enable_bucket = true) of two captioned images in two buckets."""
    folder = tmp_path_factory.mktemp("two-buckets")
    write_image_folder(folder / "img", 2, ((64, 64), (96, 64)))
    return write_dataset_toml(folder / "dataset.toml", folder / "img", resolution=64)


@pytest.mark.slow
def test_design_command_runs_on_cpu_and_writes_the_epoch_and_final_files(tiny_components, tiny_single_file,
                                                                          two_buckets, tmp_path):
    output = tmp_path / "out"
    words = DESIGN_COMMAND.format(model=tiny_single_file, dataset=two_buckets, output=output).split()
    accelerate = Path(sys.executable).with_name("accelerate")
    result = command(str(accelerate), *words[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(TE_CACHING_WARNING) == 1, result.stderr[-3000:]
    assert sorted(p.name for p in output.glob("*.safetensors")) == ["my_sdxl_lora-000001.safetensors",
                                                                    "my_sdxl_lora.safetensors"]

    epoch1, epoch1_metadata = read_lora(output / "my_sdxl_lora-000001.safetensors")
    final, metadata = read_lora(output / "my_sdxl_lora.safetensors")
    assert (epoch1_metadata["ss_epoch"], epoch1_metadata["ss_steps"]) == ("1", "2")
    assert (metadata["ss_epoch"], metadata["ss_steps"]) == ("2", "4")
    assert metadata["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("32", "16.0")
    assert (metadata["ss_mixed_precision"], metadata["ss_output_name"]) == ("bf16", "my_sdxl_lora")
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert REFERENCE_METADATA - set(metadata) == set()
    # U-Net only (the text-encoder outputs are cached); every up weight started at 0 and moved.
    assert final and all(key.startswith("lora_unet_") for key in final)
    assert all(final[k].abs().max() > 0 for k in final if ".lora_up." in k)
    assert any(not torch.equal(epoch1[k], final[k]) for k in final)

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    c = tiny_components
    pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder1, text_encoder_2=c.text_encoder2,
                                     tokenizer=c.tokenizer1, tokenizer_2=c.tokenizer2, unet=copy.deepcopy(c.unet),
                                     scheduler=EulerDiscreteScheduler())
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]),
              torch.randn(1, 77, 128, generator=torch.Generator().manual_seed(1)))
    added = {"text_embeds": torch.zeros(1, 64), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        before = pipe.unet(*inputs, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(output / "my_sdxl_lora.safetensors"))
        after = pipe.unet(*inputs, added_cond_kwargs=added).sample
    assert (after - before).abs().max() > 0


def test_adamw8bit_keeps_8bit_state_on_the_cpu():
    from lorakit.train.optimizers import build_optimizer

    weight = torch.nn.Parameter(torch.randn(64, 128))  # bitsandbytes quantizes tensors of 4096+ elements
    built = build_optimizer("AdamW8bit", [{"params": [weight]}], 1e-3, None)
    assert type(built.optimizer).__name__ == "AdamW8bit"
    weight.grad = torch.randn_like(weight)
    before = weight.detach().clone()
    built.optimizer.step()
    state = built.optimizer.state[weight]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert state["state1"].device.type == "cpu"
    assert (weight.detach() - before).abs().max() == pytest.approx(1e-3, rel=0.05)  # Adam's first step is ~lr


def test_lorakit_train_help_is_grouped():
    result = command(sys.executable, "-m", "lorakit", "train", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lorakit train")
    positions = [result.stdout.index(f"\n{group.title}:\n") for group in GROUPS]
    assert positions == sorted(positions)
    assert "--text_encoder_lr1" in result.stdout and "--fused_backward_pass" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--lerning_rate", "1e-4"], "unrecognized argument --lerning_rate (did you mean --learning_rate?)"),
    (["--pretrained_model_name_or_path", "m.safetensors", "--dataset_config", "d.toml", "--v2"],
     "not supported yet: --v2 (lorakit trains SDXL models only)"),
    (["--network_dim", "eight"], "argument --network_dim: invalid int value: 'eight'"),
])
def test_bad_flags_are_one_line_and_exit_code_2(argv, message):
    result = command(sys.executable, "sdxl_train_network.py", *argv, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"sdxl_train_network.py: error: {message}\n"
    assert "Traceback" not in result.stdout


def test_python_m_lorakit_train_trains(tiny_single_file, two_buckets, tmp_path):
    result = command(sys.executable, "-m", "lorakit", "train", "--pretrained_model_name_or_path",
                     str(tiny_single_file), "--dataset_config", str(two_buckets), "--output_dir", str(tmp_path),
                     "--output_name", "m", "--max_train_steps", "1", "--network_dim", "4",
                     "--max_data_loader_n_workers", "0", "--network_train_unet_only", "--cache_latents",
                     "--cache_text_encoder_outputs", "--seed", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    state, metadata = read_lora(tmp_path / "m.safetensors")
    assert metadata["ss_steps"] == "1" and metadata["ss_network_dim"] == "4"
