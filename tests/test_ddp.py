"""Two processes on the CPU (gloo) through `accelerate launch --multi_gpu --num_processes 2` (on a machine
without CUDA, accelerate's `--cpu` runs one process; `--multi_gpu` starts torchrun, and lorakit picks gloo): the
ranks hold identical LoRA weights at every save (the run checks and logs it), and the result equals one process
accumulating the same two batches per step — bit for bit here, since halving and two-term sums are exact."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.testing.datasets import write_dataset_toml, write_image_folder

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_accumulating_their_batches(tiny_single_file, tmp_path):
    write_image_folder(tmp_path / "img", 6)
    dataset = write_dataset_toml(tmp_path / "dataset.toml", tmp_path / "img", resolution=96,
                                 extra_subset="  shuffle_caption = true\n")

    def args(output: Path) -> list[str]:
        return ["-m", "lorakit", "train", "--pretrained_model_name_or_path", str(tiny_single_file),
                "--dataset_config", str(dataset), "--output_dir", str(output), "--output_name", "lora",
                "--max_data_loader_n_workers", "0", "--seed", "1", "--network_dim", "4", "--network_train_unet_only",
                "--cache_latents", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--max_train_steps", "4",
                "--save_every_n_steps", "2"]

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    two = subprocess.run(launch + args(tmp_path / "two"), env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batches per epoch 3 (per process)" in two.stdout
    assert two.stderr.count("LoRA weights identical on all 2 processes") == 2  # step 2 and the final save

    one = subprocess.run([sys.executable, *args(tmp_path / "one"), "--gradient_accumulation_steps", "2"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("lora-step00000002.safetensors", "lora.safetensors"):
        expected, result = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert expected.keys() == result.keys()
        assert all(torch.equal(expected[key], result[key]) for key in expected)
