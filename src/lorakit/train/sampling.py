"""Sample images during training (sd-scripts' `library/train_util.py`,
`sample_images_common`): when to sample, the samplers, and one sampling point.

Images come from the model family's diffusers pipeline (`ModelFamily.sample`: `StableDiffusionXLPipeline` for
SDXL) assembled around the live training modules: nothing is copied, and the LoRA stays applied because its
forward hooks sit on those very modules. Prompts are encoded the way training encodes captions
(`lorakit.models.text_encoding`, up to three 75-token chunks like sd-scripts' long-prompt pipeline), with
A1111 prompt weights `(word:1.2)`, `[word]` applied to the hidden states as `--weighted_captions` does (the
reference's pipeline also rescales them to keep their mean; lorakit does not).

Sampling leaves training exactly as it was: the python, numpy and torch (CPU and CUDA) RNG states are restored,
every module's train/eval flag is restored, and each prompt draws from its own `torch.Generator`.

Files of one sampling point, in `{output_dir}/sample/`:
  `[{output_name}_]{tag}_{index:02d}_{YYYYmmddHHMMSS}_{seed}.png`  one per prompt (reference names; the seed is
      always there: a prompt without `--d` gets a fresh random seed, and the name records it so it can be re-made)
  `[{output_name}_]{tag}_{YYYYmmddHHMMSS}_contact.png`               all prompts tiled, each with its prompt text
where tag is `e{epoch:06d}` at an epoch end and `{step:06d}` otherwise.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_path
from lorakit.train.sample_prompts import SamplePrompt
from lorakit.train.state import preserved_rng

# stabilityai/stable-diffusion-xl-base-1.0's scheduler config. sd-scripts builds its samplers with diffusers'
# defaults and forces clip_sample=True: clipping x0 to ±1 is meant for pixel-space models and dulls SDXL latents.
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True,
    "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
}

# --sample_sampler / --ss name -> (diffusers scheduler class, config overrides), as sd-scripts' table.
# The names are sample_prompts.SAMPLER_NAMES (checked by a test), which the prompt parser validates against.
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "k_lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "k_euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "k_euler_a": (EulerAncestralDiscreteScheduler, {}),
    # "dpmsolver" (DPM-Solver, not ++) cannot end on sigma 0, diffusers' current default.
    "dpmsolver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": (DPMSolverSinglestepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "k_dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "k_dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
}

CONTACT_CELL = 384  # longest side of an image in the contact sheet, in pixels (smaller images are not enlarged)
CONTACT_MIN_WIDTH = 320  # column width, so that captions of small images stay readable
LINE_HEIGHT = 18


def make_scheduler(name: str, v_parameterization: bool = False):
    """A fresh diffusers scheduler for a sampler name of sd-scripts' `get_my_scheduler` (DDPM scaled-linear betas
    0.00085–0.012, 1000 steps). Call it for each prompt's sampler before training to fail early (e.g. `lms` without
    scipy)."""
    if name not in SAMPLERS:
        raise LorakitError(f"sampler {name!r} is unknown; expected one of {', '.join(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    prediction = "v_prediction" if v_parameterization else "epsilon"
    try:
        with warnings.catch_warnings():  # diffusers deprecates DPM-Solver (not ++) for 1.0; lorakit pins < 1
            warnings.filterwarnings("ignore", ".*algorithm_types dpmsolver", FutureWarning)
            return cls.from_config({**SDXL_SCHEDULER_CONFIG, **overrides, "prediction_type": prediction})
    except ImportError:  # diffusers' LMS needs scipy, which lorakit does not otherwise use
        raise LorakitError(f"sampler {name!r} needs scipy, which is not installed; pip install scipy, or choose "
                           "another sampler") from None


def should_sample(when: Literal["first", "step", "epoch"], *, global_step: int, epoch: int, at_first: bool,
                  every_n_steps: int | None, every_n_epochs: int | None) -> bool:
    """sd-scripts' trigger rules. `when` is the point in the loop: "first" before training, "step" after an
    optimizer step (global_step counts completed steps), "epoch" after an epoch (epoch counts completed epochs).
    `--sample_every_n_epochs` disables step sampling. The caller checks that a prompt file was given."""
    if when == "first":
        return at_first
    if when == "epoch":
        return every_n_epochs is not None and epoch % every_n_epochs == 0
    return every_n_epochs is None and every_n_steps is not None and global_step % every_n_steps == 0


@dataclass(frozen=True)
class SamplingResult:
    images: list[Path]
    contact_sheet: Path
    seeds: list[int]


@torch.no_grad()
def generate_samples(family, components, unet, text_encoders: Sequence[torch.nn.Module],
                     prompts: Sequence[SamplePrompt], output_dir: str | Path, output_name: str | None, step: int,
                     epoch: int | None, *, v_parameterization: bool = False, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, network: torch.nn.Module | None = None,
                     clip_skip: int | None = None) -> SamplingResult:
    """Generate one image per prompt through the `family`'s pipeline, and a contact sheet. `epoch` set: an
    epoch-end point (`e{epoch:06d}` names), else a step point. Pass the unwrapped U-Net (not a DDP or compiled
    wrapper), the live text encoders, and the LoRA `network`, if any, so that its dropouts are off while
    sampling. Modules stay where they are, except that the VAE visits `device` for decoding; `dtype` other than
    float32 runs the pipeline under autocast."""
    device = torch.device(device)
    folder = Path(output_dir) / "sample"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    prefix = f"{output_name}_" if output_name else ""
    tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    vae = components.vae
    modules = [m for m in (unet, vae, *text_encoders, network) if m is not None]

    images, paths, seeds = [], [], []
    with preserved_rng(), _eval_mode(modules), _on_device(vae, device):
        for index, prompt in enumerate(prompts):
            seed = prompt.seed if prompt.seed is not None else random.SystemRandom().randrange(2**32)
            image = family.sample(components, unet, text_encoders, prompt, seed,
                                  v_parameterization=v_parameterization, device=device, dtype=dtype,
                                  scheduler=make_scheduler(prompt.sampler, v_parameterization), clip_skip=clip_skip)
            path = folder / f"{prefix}{tag}_{index:02d}_{stamp}_{seed}.png"
            with atomic_path(path) as temporary:
                image.save(temporary, format="PNG", pnginfo=_png_parameters(prompt, seed))
            images.append(image)
            paths.append(path)
            seeds.append(seed)
    contact = folder / f"{prefix}{tag}_{stamp}_contact.png"
    with atomic_path(contact) as temporary:
        contact_sheet(images, prompts, seeds).save(temporary, format="PNG")
    return SamplingResult(images=paths, contact_sheet=contact, seeds=seeds)


def _png_parameters(prompt: SamplePrompt, seed: int) -> PngInfo:
    """A1111-style `parameters` text chunk, so the settings travel with the image."""
    info = PngInfo()
    info.add_text("parameters", f"{prompt.prompt}\nNegative prompt: {prompt.negative_prompt}\n"
                                f"Steps: {prompt.steps}, Sampler: {prompt.sampler}, CFG scale: {prompt.scale}, "
                                f"Seed: {seed}, Size: {prompt.width}x{prompt.height}")
    return info


def contact_sheet(images: Sequence[Image.Image], prompts: Sequence[SamplePrompt], seeds: Sequence[int],
                  cell: int = CONTACT_CELL) -> Image.Image:
    """All images in a grid (at most `cell` px on the long side each), each with its prompt and settings below."""
    font = ImageFont.load_default(size=14)
    box = min(cell, max((max(image.size) for image in images), default=cell))
    width = max(box, CONTACT_MIN_WIDTH)
    captions = [_wrap(prompt.prompt, font, width, 4) + _wrap(
        f"{prompt.width}x{prompt.height} · {prompt.sampler} · {prompt.steps} steps · cfg {prompt.scale:g} · "
        f"seed {seed}", font, width, 2) for prompt, seed in zip(prompts, seeds)]
    columns = max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / columns))
    text_height = LINE_HEIGHT * max((len(lines) for lines in captions), default=1) + 8
    sheet = Image.new("RGB", (columns * (width + 8) + 8, rows * (box + text_height + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, captions)):
        x = 8 + (i % columns) * (width + 8)
        y = 8 + (i // columns) * (box + text_height + 8)
        thumbnail = image.copy()
        thumbnail.thumbnail((box, box))
        sheet.paste(thumbnail, (x + (width - thumbnail.width) // 2, y + (box - thumbnail.height) // 2))
        for j, line in enumerate(lines):
            draw.text((x, y + box + 4 + j * LINE_HEIGHT), line, fill="black", font=font)
    return sheet


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a cut-off text ends with an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return lines or [""]


@contextlib.contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode inside; afterwards each submodule gets back its own flag (frozen parts may differ from the rest)."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _on_device(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Move `module` to `device` for the duration (a no-op when it is there already)."""
    parameter = next(module.parameters())
    home = parameter.device
    if home == device or (device.index is None and home.type == device.type):
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(home)
