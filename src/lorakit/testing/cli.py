"""`lorakit random-model OUT`: write a random-weight model of SDXL's (or SD 1.x/2.x's) architecture for tests, demos
and benchmarks."""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FAMILIES = {"sdxl": "sdxl", "sd15": "sd1", "sd2": "sd2"}  # --family -> lorakit's model family
TITLES = {"sdxl": "SDXL", "sd15": "SD 1.5", "sd2": "SD 2.x"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output .safetensors file (single-file) or folder (diffusers)")
    parser.add_argument("--family", choices=("sdxl", "sd15", "sd2"), default="sdxl",
                        help="sdxl: SDXL base 1.0; sd15: SD 1.5; sd2: SD 2.x (its text encoder one layer short)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny",
                        help="tiny: seconds to build, for tests; full: the real base configuration")
    parser.add_argument("--format", choices=("single-file", "diffusers"), default="single-file",
                        help="single-file: one SGM/LDM-layout .safetensors like sd_xl_base_1.0; diffusers: a folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the stored weights")


def run(args: argparse.Namespace) -> int:
    from lorakit.testing.random_models import write_random_diffusers, write_random_single_file

    write = write_random_single_file if args.format == "single-file" else write_random_diffusers
    family = FAMILIES[args.family]
    start = time.perf_counter()
    write(args.out, args.size, args.seed, DTYPES[args.dtype], family)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {args.out}: {args.size} {TITLES[args.family]}, {args.format}, {args.dtype}, seed {args.seed}, "
          f"{_size_bytes(args.out) / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s, "
          f"peak RSS {peak_gib:.2f} GiB")
    return 0


def _size_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
