"""`lorakit random-model OUT`: write a random-weight SDXL-architecture model for tests, demos and benchmarks."""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output .safetensors file (single-file) or folder (diffusers)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny",
                        help="tiny: seconds to build, for tests; full: the real SDXL base 1.0 configuration")
    parser.add_argument("--format", choices=("single-file", "diffusers"), default="single-file",
                        help="single-file: one SGM-layout .safetensors like sd_xl_base_1.0; diffusers: a folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the stored weights")


def run(args: argparse.Namespace) -> int:
    from lorakit.testing.random_models import write_random_diffusers, write_random_single_file

    write = write_random_single_file if args.format == "single-file" else write_random_diffusers
    start = time.perf_counter()
    write(args.out, args.size, args.seed, DTYPES[args.dtype])
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {args.out}: {args.size} SDXL, {args.format}, {args.dtype}, seed {args.seed}, "
          f"{_size_bytes(args.out) / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s, peak RSS {peak_gib:.2f} GiB")
    return 0


def _size_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
