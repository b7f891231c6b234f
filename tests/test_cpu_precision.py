"""bf16 on a CPU without native bf16 is said in one warning line with the measured rates and the flag to use
instead. ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA make this CPU take the kernels of an AVX2-only one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lorakit.testing.datasets import write_dataset_toml, write_image_folder

SRC = Path(__file__).resolve().parents[1] / "src"


def dry_run(model: Path, folder: Path, precision: str, **env: str) -> subprocess.CompletedProcess:
    write_image_folder(folder / "img", 1, sizes=((64, 64),))
    dataset = write_dataset_toml(folder / "dataset.toml", folder / "img", resolution=64)
    command = [sys.executable, "-m", "lorakit", "train", "--pretrained_model_name_or_path", str(model),
               "--dataset_config", str(dataset), "--output_dir", str(folder / "out"), "--mixed_precision", precision,
               "--dry_run"]
    return subprocess.run(command, env={**os.environ, "PYTHONPATH": str(SRC), **env}, capture_output=True,
                          text=True, timeout=300)


def test_bf16_on_an_avx2_only_cpu_is_one_warning_with_the_measured_rates(tiny_single_file, tmp_path):
    result = dry_run(tiny_single_file, tmp_path, "bf16", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "without native bf16" in line]
    assert len(warnings) == 1, result.stderr
    assert "(AVX2): bf16 matrix products run at" in warnings[0] and "use --mixed_precision no" in warnings[0]
    assert "CPU: AVX2 (no native bf16)" in result.stdout


def test_fp32_has_no_warning_and_names_the_capability(tiny_single_file, tmp_path):
    result = dry_run(tiny_single_file, tmp_path, "no", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert result.returncode == 0, result.stderr
    assert "without native bf16" not in result.stderr
    assert "CPU: AVX2; computing in fp32" in result.stdout
