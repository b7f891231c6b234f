"""Seconds per training step, peak memory and FLOP utilisation of `lorakit train` (tiny or full SDXL, CPU or GPU).

    PYTHONPATH=src python bench/train_step.py [--size tiny|full] [--steps N] [--checkpoint PATH]
        [--runs adamw fused] [--plans all budget none] [--budget-gb GIB] [--precision auto|bf16|fp32]
        [--resolution 256] [--dim 8] [--threads N] [--extra "FLAGS"] [--profile] [--keep]

Each run is the real `lorakit train` (`lorakit.train.cli.main`) in a fresh process, on one synthetic
`resolution`² image repeated for N steps: batch 1, LoRA rank `--dim`, U-Net only, `--cache_latents
--cache_text_encoder_outputs`, AdamW (`adamw`, sd-scripts' settings) or `--fused_backward_pass` with Adafactor
(`fused`). Precision: `bf16` is `--mixed_precision bf16 --full_bf16`, `mixed` the same without `--full_bf16` (a
float32 network under autocast), `fp32` is `--mixed_precision no`; `auto`
takes fp32 on a CPU whose bf16 matrix products run at less than half its fp32 rate (no native bf16: AVX2-only
CPUs run them ~450x slower). Gradient checkpointing per `--plans`: `all` (`--gradient_checkpointing_blocks all`,
sd-scripts' behaviour), `budget` (`--gradient_checkpointing` with `--memory_budget_gb`, or a GPU's free memory),
`none`. sd-scripts ran the bf16 settings at 5.9 s/step and 16.9 GB max RSS on this machine.

Timing: a forward pre-hook on the U-Net stamps the start of each step, so a step is everything from one U-Net call
to the next (forward, backward, optimizer, scheduler, data loading); the last step ends at its last optimizer step.
s/step is the median of the steps after the first. Memory: VmHWM and ru_maxrss of the training process (loading and
caching included, as sd-scripts' figure), the peaks of RSS and anonymous RSS sampled every 20 ms, overall and during
the steps, and on a GPU `torch.cuda.max_memory_allocated` from the first step on; each is set against the memory
estimate the run printed (`lorakit.train.memory`). FLOP utilisation: the model's FLOPs per step (forward and
backward counted by torch's FlopCounterMode on the meta device, recomputation not counted) per second, against the
measured rate of a large matrix product in the run's dtype with the run's threads. The 1-minute load average is
printed before and after each run: figures taken while it is above ~1 are not the machine's own: when other
processes hold the cores, torch's OpenMP threads wait for each other at every op (a tiny step took 10-50x longer
with 2 threads than with 1 at load 8-13), so `--threads 1` and the CPU time per step show the work itself.

Without --checkpoint, a random checkpoint is written with `lorakit random-model --size SIZE --format single-file
--dtype fp16` (full: about 6.9 GB under the temp folder) and deleted afterwards unless --keep.
`--profile` adds a torch.profiler (CPU) table of one step (the second; excluded from the median).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
GB, GIB = 1e9, 2**30
REFERENCE = {"seconds": 5.9, "max_rss": 16.9e9, "anon": 9.9e9}  # sd-scripts on this machine (issue 5)
GOAL = {"seconds": 0.75, "max_rss": 0.45}  # fractions of sd-scripts' figures

COMMON = ["--network_module", "networks.lora", "--network_train_unet_only", "--cache_latents",
          "--cache_text_encoder_outputs", "--lr_scheduler", "constant", "--learning_rate", "1e-4", "--seed", "0",
          "--save_model_as", "safetensors", "--output_name", "bench"]
PRECISION = {"bf16": ["--mixed_precision", "bf16", "--full_bf16"], "mixed": ["--mixed_precision", "bf16"],
             "fp32": ["--mixed_precision", "no"]}
PLANS = ("all", "budget", "none")
PLAN_FLAGS = {"all": ["--gradient_checkpointing", "--gradient_checkpointing_blocks", "all"],
              "budget": ["--gradient_checkpointing"], "none": []}
RUNS = {
    "adamw": ["--optimizer_type", "AdamW"],
    "fused": ["--optimizer_type", "Adafactor", "--fused_backward_pass", "--optimizer_args", "scale_parameter=False",
              "relative_step=False", "warmup_init=False"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (tiny 12, full 4)")
    parser.add_argument("--checkpoint", help="an SDXL single-file checkpoint to reuse instead of a random one")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--plans", nargs="+", choices=PLANS, default=["all"],
                        help="gradient checkpointing of each run: every block (sd-scripts), the budget plan "
                        "(--budget-gb), none")
    parser.add_argument("--budget-gb", type=float, help="--memory_budget_gb of the 'budget' plan (GiB; on a GPU "
                        "the default is its free memory)")
    parser.add_argument("--precision", choices=("auto", *PRECISION), default="auto",
                        help="bf16: --full_bf16; mixed: bf16 autocast over a float32 network; auto: bf16 where "
                        "the CPU (or GPU) multiplies bf16 at least half as fast as fp32, else fp32")
    parser.add_argument("--dim", type=int, default=8, help="--network_dim")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--extra", default="", help="more `lorakit train` flags for every run, e.g. "
                        "'--torch_compile' (sd-scripts' figures are for the settings above)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the training process (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the second step")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and a checkpoint this run made")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))

    if "budget" in args.plans and args.budget_gb is None and not _cuda():
        parser.error("the 'budget' plan on a CPU needs --budget-gb")
    steps = args.steps or (12 if args.size == "tiny" else 4)
    precision = choose_precision(args.precision)
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    checkpoint = args.checkpoint or str(work / f"random-{args.size}-fp16.safetensors")
    try:
        if not args.checkpoint:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lorakit", "random-model", checkpoint, "--size", args.size,
                            "--format", "single-file", "--dtype", "fp16"], env=_env(), check=True,
                           capture_output=True)
            print(f"random {args.size} checkpoint written in {time.perf_counter() - started:.0f} s")
        dataset = write_dataset(work, args.resolution, steps)
        print(f"checkpoint {checkpoint} ({os.path.getsize(checkpoint) / GB:.2f} GB), {args.resolution} px, "
              f"{steps} steps per run, {os.cpu_count()} CPUs, {device_name()}, {precision}, dim {args.dim}"
              + (f", extra flags: {args.extra}" if args.extra else ""))
        flops = step_flops(args.size, args.resolution, args.dim, precision)
        for name in args.runs:
            for plan in args.plans:
                argv = ["--pretrained_model_name_or_path", checkpoint, "--dataset_config", str(dataset),
                        "--output_dir", str(work / name), "--max_train_steps", str(steps), "--network_dim",
                        str(args.dim), *COMMON, *PRECISION[precision], *PLAN_FLAGS[plan], *RUNS[name],
                        *shlex.split(args.extra)]
                if plan == "budget" and args.budget_gb is not None:
                    argv += ["--memory_budget_gb", str(args.budget_gb)]
                load_before = _load_average()
                result = _child({"argv": argv, "profile": args.profile, "fused": name == "fused"}, args.threads)
                report(f"{name}, checkpointing {plan}", args.size, result, load_before, _load_average(), flops,
                       precision)
    finally:
        if not args.keep:
            shutil.rmtree(work)
        else:
            print(f"kept {work}")


def write_dataset(work: Path, resolution: int, repeats: int) -> Path:
    """One captioned square image, repeated so that one epoch holds every step."""
    from lorakit.testing.datasets import write_image_folder

    write_image_folder(work / "images", count=1, sizes=((resolution, resolution),))
    path = work / "dataset.toml"
    path.write_text(f'[general]\nenable_bucket = false\ncaption_extension = ".txt"\n\n[[datasets]]\n'
                    f"resolution = {resolution}\nbatch_size = 1\n\n  [[datasets.subsets]]\n"
                    f'  image_dir = "{(work / "images").as_posix()}"\n  num_repeats = {repeats}\n')
    return path


def report(name: str, size: str, result: dict, load_before: str, load_after: str, flops: float,
           precision: str) -> None:
    steps = result["step_seconds"]
    kept = [i for i in range(1, len(steps)) if i != result.get("profiled_step")]
    median = statistics.median(steps[i] for i in kept) if kept else float("nan")
    cpu = statistics.median(result["cpu_seconds"][i] for i in kept) if kept else float("nan")
    memory = result["memory"]
    print(f"\n[{name}] {size}: {median:.2f} s/step (median of {len(kept)} after the first; all: "
          f"{', '.join(f'{s:.2f}' for s in steps)}); CPU time {cpu:.2f} s/step")
    print(f"  first step after {result['setup_seconds']:.1f} s of loading and caching; torch threads "
          f"{result['threads']}; fused hooks: {result['fused']}")
    print(f"  peak RSS {memory['VmHWM'] / GB:.2f} GB ({memory['VmHWM'] / GIB:.2f} GiB; ru_maxrss "
          f"{result['ru_maxrss'] / GB:.2f} GB), anonymous {memory['peak_RssAnon'] / GB:.2f} GB; during the steps "
          f"RSS {memory['steps_VmRSS'] / GB:.2f} GB, anonymous {memory['steps_RssAnon'] / GB:.2f} GB; "
          f"RSS at the first step {memory['first_step_VmRSS'] / GB:.2f} GB")
    on_gpu = result["cuda_max_allocated"] is not None
    measured = result["cuda_max_allocated"] if on_gpu else memory["steps_VmRSS"]
    if result["estimate"]:
        print(f"  estimated peak {result['estimate'] / GIB:.2f} GiB, measured "
              f"({'torch.cuda.max_memory_allocated' if on_gpu else 'RSS during the steps'}) {measured / GIB:.2f} "
              f"GiB: estimate/measured {result['estimate'] / measured:.2f}")
    print(f"  {result['plan']}")
    rate, dtype = result["matmul_rate"], "fp32" if precision == "fp32" else "bf16"
    print(f"  model FLOPs {flops / 1e12:.3f} TFLOP/step (forward + backward, no recomputation): "
          f"{flops / median / 1e9:.1f} GFLOP/s = {flops / median / rate:.1%} of the measured {dtype} "
          f"matrix-product rate ({rate / 1e9:.0f} GFLOP/s, {result['threads']} threads)")
    if size == "full" and name.startswith("adamw") and precision == "bf16":  # sd-scripts' figures are bf16
        print(f"  vs sd-scripts (5.9 s/step, 16.9 GB max RSS): time {median / REFERENCE['seconds']:.2f}x "
              f"(goal <= {GOAL['seconds']}x), max RSS {memory['VmHWM'] / REFERENCE['max_rss']:.2f}x "
              f"(goal <= {GOAL['max_rss']}x)")
    print(f"  load average before: {load_before}; after: {load_after}; {device_name()}")
    if result.get("profile"):
        print(result["profile"])


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}"
    return f"CPU {torch.backends.cpu.get_cpu_capability()}"


def choose_precision(asked: str) -> str:
    """bf16 unless it multiplies at less than half the fp32 rate (CPUs without native bf16: ~450x slower)."""
    if asked != "auto":
        return asked
    import torch

    if torch.cuda.is_available():
        return "bf16"
    from lorakit.train.preflight import SLOW_BF16, matmul_rate

    fast = matmul_rate(torch.bfloat16) >= SLOW_BF16 * matmul_rate(torch.float32)
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}: {'native' if fast else 'no native'} bf16, so "
          f"{'bf16' if fast else 'fp32'}")
    return "bf16" if fast else "fp32"


def step_flops(size: str, resolution: int, dim: int, precision: str) -> float:
    """FLOPs of one training step's forward and backward (torch's FlopCounterMode on the meta device: the
    model's FLOPs, without gradient checkpointing's recomputation), U-Net with a LoRA of rank `dim`, batch 1."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lorakit.families import family_named
    from lorakit.network.network import build_network

    family = family_named("sdxl")
    part = next(p for p in family.layout.parts() if p.attribute == "unet")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    with torch.device("meta"):
        unet = torch.nn.Module.to(part.build(part.config(size)), dtype)
    network = build_network(unet, [], network_dim=dim, network_alpha=1, train_text_encoder=False, lora=family.lora)
    network.attach()
    network.to(dtype)
    with torch.device("meta"):
        noisy = torch.empty(1, 4, resolution // 8, resolution // 8, dtype=dtype)
        sizes = torch.empty(1, 6, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        prediction = family.predict(unet, noisy, torch.zeros(1, dtype=torch.long, device="meta"),
                                    family.text_stand_in(unet, 1, 77), sizes)
        prediction.float().square().mean().backward()
    return counter.get_total_flops()


def matmul_rate(dtype) -> float:
    """FLOP/s of a large matrix product in `dtype` with the process's threads (the best of 5 after a warm-up)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ---------------------------------------------------------------------------------------------------- the child


def run_child(spec: dict) -> None:
    """Run `lorakit train` with step stamps, a memory sampler and (optionally) a profiler; print one JSON line."""
    import resource

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import lorakit.train.run_setup as run_setup
    import lorakit.train.trainer as trainer
    from lorakit.families.base import ModelFamily
    from lorakit.train.cli import main as train_main

    started = time.perf_counter()
    starts: list[float] = []
    cpu_starts: list[float] = []
    last_optimizer_step = [0.0, 0.0]
    built_optimizers = []
    sampler = MemorySampler()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if spec["profile"] else None
    fused = {"state": "no"}
    load_family, build_optimizer, preflight = ModelFamily.load, run_setup.build_optimizer, trainer.preflight
    checked = []

    def on_step_start(_module, _inputs) -> None:
        if not starts:
            sampler.mark_steps()
            if torch.cuda.is_available():  # the steps' peak, not the caching's (VAE encodes) before them
                torch.cuda.reset_peak_memory_stats()
            if spec["fused"]:
                fused["state"] = _fused_hooks(built_optimizers[-1])
        if profiler is not None and len(starts) == 1:
            profiler.start()
        if profiler is not None and len(starts) == 2:
            profiler.stop()
        starts.append(time.perf_counter())
        cpu_starts.append(time.process_time())

    def loading_with_hook(*args, **kwargs):
        components = load_family(*args, **kwargs)
        # with both caches the trainer loads the U-Net in a second call; the checks' meta model is no step
        if components.unet is not None and kwargs.get("device") != "meta":
            components.unet.register_forward_pre_hook(on_step_start)
        return components

    def remembering_optimizer(*args, **kwargs):
        built = build_optimizer(*args, **kwargs)
        built_optimizers.append(built)
        return built

    def remembering_preflight(*args, **kwargs):
        checked.append(preflight(*args, **kwargs))
        return checked[-1]

    ModelFamily.load, run_setup.build_optimizer = loading_with_hook, remembering_optimizer
    trainer.preflight = remembering_preflight
    register_optimizer_step_post_hook(lambda *_: last_optimizer_step.__setitem__(
        slice(None), [time.perf_counter(), time.process_time()]))
    sampler.start()
    code = train_main(spec["argv"])
    if profiler is not None and len(starts) == 2:
        profiler.stop()
    sampler.stop()
    if code:
        raise SystemExit(code)
    status = _status()
    step_seconds = [b - a for a, b in zip(starts, starts[1:])] + [last_optimizer_step[0] - starts[-1]]
    cpu_seconds = [b - a for a, b in zip(cpu_starts, cpu_starts[1:])] + [last_optimizer_step[1] - cpu_starts[-1]]
    memory = checked[0].memory if checked else None
    result = {
        "estimate": memory.total if memory is not None else None,
        "plan": memory.plan.describe() if memory is not None and memory.plan is not None else "no checkpointing",
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "matmul_rate": matmul_rate(torch.bfloat16 if "bf16" in spec["argv"] else torch.float32),
        "step_seconds": step_seconds, "cpu_seconds": cpu_seconds, "setup_seconds": starts[0] - started,
        "threads": torch.get_num_threads(),
        "fused": fused["state"], "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory": {"VmHWM": status["VmHWM"], **sampler.peaks},
    }
    if profiler is not None:
        result["profiled_step"] = 1
        result["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(json.dumps(result))


def _fused_hooks(built) -> str:
    """Whether every trained parameter carries the per-parameter step hook of `--fused_backward_pass`."""
    params = [p for group in built.optimizer.param_groups for p in group["params"]]
    return "trainer" if all(p._post_accumulate_grad_hooks for p in params) else "MISSING"


class MemorySampler:
    """Peaks of VmRSS and RssAnon from /proc/self/status every 20 ms, overall and after `mark_steps()`."""

    def __init__(self) -> None:
        self.peaks = {"peak_VmRSS": 0, "peak_RssAnon": 0, "steps_VmRSS": 0, "steps_RssAnon": 0,
                      "first_step_VmRSS": 0}
        self._in_steps = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def mark_steps(self) -> None:
        self.peaks["first_step_VmRSS"] = _status()["VmRSS"]
        self._in_steps = True

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._done.wait(0.02):
            self._sample()

    def _sample(self) -> None:
        status = _status()
        for name in ("VmRSS", "RssAnon"):
            self.peaks[f"peak_{name}"] = max(self.peaks[f"peak_{name}"], status[name])
            if self._in_steps:
                self.peaks[f"steps_{name}"] = max(self.peaks[f"steps_{name}"], status[name])


def _status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _child(spec: dict, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = _env() if threads is None else {**_env(), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the training run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}


if __name__ == "__main__":
    main()
