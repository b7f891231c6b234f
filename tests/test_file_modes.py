"""Files a run writes get the mode the user's umask gives (0644 under umask 022), as sd-scripts' do: a ComfyUI or
A1111 running as another user must be able to read a LoRA the moment it is saved."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from lorakit.fileio import atomic_path
from lorakit.testing.datasets import write_dataset_toml, write_image_folder

SRC = Path(__file__).resolve().parents[1] / "src"


def modes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode) for path in folder.rglob("*")}


def test_every_file_of_a_run_is_0644_under_umask_022(tiny_single_file, tmp_path):
    write_image_folder(tmp_path / "img", 2)
    dataset = write_dataset_toml(tmp_path / "dataset.toml", tmp_path / "img", resolution=64,
                                 extra_subset="  cache_info = true\n")
    (tmp_path / "prompts.txt").write_text("lkt style, a red circle --w 64 --h 64 --s 2\n")
    before = set(modes(tmp_path))
    command = [sys.executable, "-m", "lorakit", "train", "--pretrained_model_name_or_path", str(tiny_single_file),
               "--dataset_config", str(dataset), "--output_dir", str(tmp_path / "out"), "--output_name", "lora",
               "--network_dim", "2", "--network_train_unet_only", "--max_train_steps", "2", "--save_every_n_steps",
               "1", "--save_state", "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk",
               "--sample_prompts", str(tmp_path / "prompts.txt"), "--sample_every_n_steps", "2",
               "--logging_dir", str(tmp_path / "logs"), "--max_data_loader_n_workers", "0", "--seed", "1"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    subprocess.run(command, env=env, check=True, capture_output=True, preexec_fn=lambda: os.umask(0o022))

    written = {name: mode for name, mode in modes(tmp_path).items() if name not in before}
    kinds = {".safetensors", ".png", ".json", ""}
    assert {Path(name).suffix for name in written} >= kinds, sorted(written)  # LoRAs, states, caches, curves...
    assert any("_lorakit" in name for name in written) and any("sample" in name for name in written)
    wrong = {name: oct(mode) for name, mode in written.items()
             if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)}
    assert not wrong


def test_atomic_writes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "file.bin") as temporary:
            temporary.write_bytes(b"x")
            temporary.chmod(0o600)  # as safetensors leaves its files
        with atomic_path(tmp_path / "folder") as temporary:
            temporary.mkdir(mode=0o700)
            (temporary / "inner.bin").write_bytes(b"x")
            (temporary / "inner.bin").chmod(0o600)
    finally:
        os.umask(previous)
    assert modes(tmp_path) == {"file.bin": 0o640, "folder": 0o750, "folder/inner.bin": 0o640}
