"""`lorakit demo`: the command the README points newcomers to trains, saves a loadable LoRA, a curve and a
summary, and says where they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_one_epoch_and_writes_lora_curve_and_summary(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "lorakit", "demo", "--workdir", str(tmp_path), "--epochs", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "output" / "demo_summary.json").read_text())
    assert summary["steps"] == 9  # 9 images, batch 1, one epoch
    lora = Path(summary["lora"])
    assert lora == tmp_path / "output" / "demo_lora.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_network_dim"] == "8"
    assert keys and all(key.startswith("lora_unet_") for key in keys)  # --network_train_unet_only
    assert Path(summary["curve"]).is_file()
    assert f"LoRA:        {lora}" in result.stdout
    assert not list((tmp_path / "output").glob(".*tmp-*"))  # every write went through a temporary and was renamed
