"""`lorakit demo`: a real training run on a tiny random SDXL-architecture checkpoint and synthetic captioned
images in three aspect ratios, with the settings of the README's training command scaled down. About half a minute
on 2 CPU cores; writes the LoRA, a loss curve PNG and a run summary, and prints where they are."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from lorakit.console import configure_logging
from lorakit.errors import guarded
from lorakit.fileio import atomic_path


def seed_command(model: Path, dataset: Path, output: Path, *, epochs: int, optimizer: str, precision: str) -> list[str]:
    """The README's training command, with the model, the dataset, the epochs and what a CPU cannot do swapped out."""
    return [
        f"--pretrained_model_name_or_path={model}", f"--dataset_config={dataset}",
        f"--output_dir={output}", "--output_name=demo_lora", "--save_model_as=safetensors",
        "--network_module=networks.lora", "--network_dim=8", "--network_alpha=4",
        "--learning_rate=1e-3", "--unet_lr=1e-3", "--text_encoder_lr1=1e-5", "--text_encoder_lr2=1e-5",
        f"--optimizer_type={optimizer}", "--lr_scheduler=constant", f"--max_train_epochs={epochs}",
        "--save_every_n_epochs=1", f"--mixed_precision={precision}", "--gradient_checkpointing",
        "--cache_text_encoder_outputs", "--cache_latents", "--network_train_unet_only", "--seed=42",
        "--max_data_loader_n_workers=0",
    ]


def main(argv: list[str] | None = None, prog: str = "lorakit demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="lorakit-demo", help="folder for the model, images and outputs")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of 9 steps (the seed command's 10)")
    args = parser.parse_args(argv)
    return guarded(prog, argv or [], lambda: _demo(args, prog))


def _demo(args: argparse.Namespace, prog: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo makes its model: nothing may come from the hub
    configure_logging("INFO", None, True)
    from lorakit.testing.datasets import write_dataset_toml, write_image_folder
    from lorakit.testing.random_models import write_random_single_file

    workdir = Path(args.workdir).resolve()
    model = workdir / "tiny-sdxl.safetensors"
    images = workdir / "images"
    output = workdir / "output"
    started = time.perf_counter()
    if not model.exists():
        write_random_single_file(model, "tiny", 0, torch.float32)
    write_image_folder(images, count=9)
    dataset = write_dataset_toml(workdir / "dataset.toml", images, resolution=96)
    # bitsandbytes keeps real 8-bit state on CPUs too; the demo falls back to AdamW when it is not installed.
    optimizer = "AdamW8bit" if importlib.util.find_spec("bitsandbytes") else "AdamW"
    # Tiny models run fastest in fp32 on one CPU thread (their ops are too small to split); a GPU gets bf16.
    precision = "bf16" if torch.cuda.is_available() else "no"
    torch.set_num_threads(1)
    command = seed_command(model, dataset, output, epochs=args.epochs, optimizer=optimizer, precision=precision)
    print("lorakit demo: sdxl_train_network.py " + " ".join(command), flush=True)
    from lorakit.config import parse_train_args
    from lorakit.train.trainer import train

    result = train(parse_train_args(command, prog=prog))
    curve = _curve(output, result.losses)
    summary = {
        "command": ["sdxl_train_network.py", *command],
        "steps": result.global_step,
        "first_losses": result.losses[:3],
        "last_losses": result.losses[-3:],
        "lora": str(result.final_file),
        "curve": str(curve),
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_path(output / "demo_summary.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nlorakit demo: trained {result.global_step} steps in {summary['seconds']} s")
    print(f"  LoRA:        {result.final_file}")
    print(f"  loss curve:  {curve}")
    print(f"  summary:     {output / 'demo_summary.json'}")
    print(f"  inspect it:  lorakit inspect {result.final_file}")
    return 0


def _curve(output: Path, losses: list[float]) -> Path:
    """The trainer's curve PNG when it wrote one, else drawn here from the step losses."""
    written = sorted(output.glob("*curves*.png"))
    if written:
        return written[0]
    from lorakit.train.logs import write_curves_png

    path = output / "demo_lora_curves.png"
    write_curves_png({"loss/current": list(enumerate(losses, start=1))}, path)
    return path
