"""Load time and memory of `load_sdxl` on a full-size SDXL checkpoint (fp16 file -> bf16 components).

    PYTHONPATH=src python bench/load.py [CHECKPOINT] [--repeats 3] [--keep]

Without an existing CHECKPOINT, one is made with `lorakit random-model --size full --format single-file --dtype fp16`
(about 6.9 GB) and deleted afterwards unless --keep. Each load runs in a fresh process, so peak RSS (VmHWM) is the
load's own. Goal: peak RSS <= 1.3x the loaded components' bf16 size, and no mapping of the file left after loading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?",
                        default=os.path.join(tempfile.gettempdir(), "lorakit-sdxl-full-fp16.safetensors"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep a checkpoint this run made")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_one_load(args.checkpoint)

    made = not os.path.exists(args.checkpoint)
    if made:
        command = [sys.executable, "-m", "lorakit", "random-model", args.checkpoint, "--size", "full",
                   "--format", "single-file", "--dtype", "fp16"]
        print("writing:", subprocess.run(command, env=_env(), check=True, capture_output=True, text=True)
              .stdout.strip())
    try:
        runs = [_child(args.checkpoint) for _ in range(args.repeats)]
    finally:
        if made and not args.keep:
            os.remove(args.checkpoint)
    report(args.checkpoint, runs)


def measure_one_load(checkpoint: str) -> None:
    start = time.perf_counter()
    import torch

    from lorakit.models import load_sdxl
    from lorakit.models.components import sdxl_networks
    from lorakit.models.tokenizers import load_tokenizers

    sdxl_networks(), load_tokenizers()  # imports diffusers/transformers and builds the tokenizers: timed apart
    imports = time.perf_counter() - start
    before = _status()
    start = time.perf_counter()
    components = load_sdxl(checkpoint, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    after = _status()
    loaded = sum(t.nbytes for module in components.networks().values()
                 for t in [*module.parameters(), *module.buffers()])
    mapped = sum(os.path.realpath(checkpoint) in line for line in Path("/proc/self/maps").read_text().splitlines())
    print(json.dumps({"seconds": seconds, "imports": imports, "rss_before": before["VmRSS"], "peak": after["VmHWM"],
                      "rss_after": after["VmRSS"], "loaded": loaded, "mappings": mapped}))


def report(checkpoint: str, runs: list[dict]) -> None:
    peak = max(run["peak"] for run in runs)
    loaded = runs[0]["loaded"]
    print(f"checkpoint: {checkpoint} ({os.path.getsize(checkpoint) / GIB:.2f} GiB)" if os.path.exists(checkpoint)
          else f"checkpoint: {checkpoint} (deleted)")
    seconds = [run["seconds"] for run in runs]
    print(f"load into bf16: {statistics.median(seconds):.1f} s median of {len(runs)} "
          f"({', '.join(f'{s:.1f}' for s in seconds)}), after {runs[0]['imports']:.1f} s of imports")
    print(f"loaded components (bf16): {loaded / GIB:.2f} GiB")
    print(f"peak RSS: {peak / GIB:.2f} GiB = {peak / loaded:.2f}x the loaded size (goal <= 1.3x); "
          f"RSS before loading (interpreter + imports): {runs[0]['rss_before'] / GIB:.2f} GiB")
    print(f"RSS after loading: {max(run['rss_after'] for run in runs) / GIB:.2f} GiB; "
          f"mappings of the file left: {max(run['mappings'] for run in runs)}")


def _child(checkpoint: str) -> dict:
    command = [sys.executable, __file__, checkpoint, "--child"]
    result = subprocess.run(command, env=_env(), check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}


if __name__ == "__main__":
    main()
