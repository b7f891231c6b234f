"""Latent-caching throughput: `cache_latents` with the tiny and the full-size SDXL VAE (random weights).

    PYTHONPATH=src python bench/cache.py [--sizes tiny full] [--images 8] [--resolution 256] [--dtype bf16]
                                         [--batch-sizes 1 4] [--runs 3] [--threads N]

Synthetic PNG images slightly larger than `resolution`² (so each is decoded, resized and cropped as in training)
are cached in memory, as a run with `--cache_latents` does; each (VAE, batch size) pair is run once to warm up
and then `--runs` times, and the median is printed as seconds per image and images per second. sd-scripts
takes 1.41 s per 256 px image on this machine with the full VAE; the goal is <= 0.7 s. The 1-minute load
average is printed before and after: figures taken while it is above ~1 are not the machine's own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import diffusers
import torch
from diffusers import AutoencoderKL
from PIL import Image

from lorakit.data.buckets import bucket_resolutions, interpolation_for, place_image
from lorakit.data.latent_cache import LatentItem, cache_latents
from lorakit.models.vae import vae_config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_items(folder: Path, count: int, resolution: int) -> list[LatentItem]:
    buckets = bucket_resolutions((resolution, resolution), 64, resolution * 2, 64)
    items = []
    rng = np.random.default_rng(0)
    for i in range(count):
        size = (resolution + 24, resolution + 16)
        path = folder / f"image{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
        bucket, resized = place_image(size, buckets, resolution * resolution, 64)
        items.append(LatentItem(path, size, bucket, resized, interpolation_for(size, resized)))
    return items


def measure(vae: AutoencoderKL, items: list[LatentItem], batch_size: int, runs: int) -> list[float]:
    cache_latents(items, vae, vae_identity="bench", batch_size=batch_size, progress=False)  # warm-up
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        cache_latents(items, vae, vae_identity="bench", batch_size=batch_size, progress=False)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()  # a bare AutoencoderKL cast to bf16 warns about fp32 modules

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        items = make_items(Path(folder), args.images, args.resolution)
        for size in args.sizes:
            torch.manual_seed(0)
            vae = AutoencoderKL(**vae_config(size)).to(DTYPES[args.dtype]).eval()
            for batch_size in args.batch_sizes:
                seconds = measure(vae, items, batch_size, args.runs)
                per_image = statistics.median(seconds) / len(items)
                runs = ", ".join(f"{s / len(items):.3f}" for s in seconds)
                print(
                    f"{size:>4} VAE {args.dtype} {args.resolution}px vae_batch_size {batch_size}: median "
                    f"{per_image:.3f} s/image, {1 / per_image:.2f} images/s (runs: {runs} s/image; best is the"
                    " machine's figure when it is shared)"
                )
            del vae
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
