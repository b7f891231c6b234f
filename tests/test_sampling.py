"""Sample images during training (sd-scripts' `sample_images_common`) on the tiny SDXL: samplers, triggers, file
names, contact sheet, RNG isolation, train/eval modes and the live LoRA."""

from __future__ import annotations

import importlib.util
import inspect
import random
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, KDPM2AncestralDiscreteScheduler
from PIL import Image

from lorakit.errors import LorakitError
from lorakit.network.network import build_network
from lorakit.testing.random_models import random_components
from lorakit.families import family_named
from lorakit.train.sample_prompts import SAMPLER_NAMES, SamplePrompt, parse_sample_prompts
from lorakit.train.sampling import CONTACT_MIN_WIDTH, SAMPLERS, generate_samples, make_scheduler, should_sample

# diffusers' schedulers trip numpy 2 deprecation warnings by the thousand.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def components():
    return random_components("tiny", seed=0)


def sample(components, prompts, tmp_path, output_name="lora", step=12, epoch=None, **kwargs):
    c = components
    return generate_samples(family_named("sdxl"), c, c.unet, c.text_encoders, prompts, tmp_path, output_name, step,
                            epoch, **kwargs)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ---------------------------------------------------------------- samplers


def test_sampler_table_covers_every_name() -> None:
    assert set(SAMPLERS) == set(SAMPLER_NAMES)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("v_parameterization", [False, True])
def test_every_sampler_builds_and_steps(name: str, v_parameterization: bool) -> None:
    if name in ("lms", "k_lms") and importlib.util.find_spec("scipy") is None:
        with pytest.raises(LorakitError, match="needs scipy"):
            make_scheduler(name, v_parameterization)
        return
    scheduler = make_scheduler(name, v_parameterization)
    assert type(scheduler) is SAMPLERS[name][0]
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule, config.num_train_timesteps) == (
        0.00085, 0.012, "scaled_linear", 1000)
    assert config.get("prediction_type", "epsilon") == ("v_prediction" if v_parameterization else "epsilon")
    # It runs: a few denoising steps on a constant model output stay finite.
    scheduler.set_timesteps(4)
    step_parameters = inspect.signature(scheduler.step).parameters
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        extra = {"generator": torch.Generator().manual_seed(1)} if "generator" in step_parameters else {}
        x = scheduler.step(torch.zeros_like(model_input), t, x, **extra).prev_sample
    assert torch.isfinite(x).all()


def test_sampler_aliases_and_options() -> None:
    assert type(make_scheduler("k_dpm_2_a")) is KDPM2AncestralDiscreteScheduler
    assert make_scheduler("dpmsolver").config.algorithm_type == "dpmsolver"
    assert make_scheduler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert type(make_scheduler("dpmsolver")) is DPMSolverMultistepScheduler
    # SDXL's published config: no x0 clipping of latents (sd-scripts forces it on).
    assert make_scheduler("ddim").config.clip_sample is False
    assert type(make_scheduler("ddim")) is DDIMScheduler


def test_unknown_sampler_is_one_error_line() -> None:
    with pytest.raises(LorakitError, match="line 'x --ss turbo': --ss is 'turbo'; expected one of ddim, "):
        parse_sample_prompts("x --ss turbo", ".txt", default_sampler="euler")
    with pytest.raises(LorakitError, match="sampler 'turbo' is unknown"):
        make_scheduler("turbo")


# ---------------------------------------------------------------- triggers


@pytest.mark.parametrize(("when", "step", "epoch", "at_first", "n_steps", "n_epochs", "expected"), [
    ("first", 0, 0, True, None, None, True),
    ("first", 0, 0, False, 5, 1, False),
    ("step", 10, 1, False, 5, None, True),
    ("step", 11, 1, False, 5, None, False),
    ("step", 10, 1, False, None, None, False),
    ("step", 10, 1, False, 5, 2, False),  # every_n_epochs disables step sampling
    ("epoch", 10, 2, False, 5, 2, True),
    ("epoch", 10, 3, False, 5, 2, False),
    ("epoch", 10, 2, False, 5, None, False),
])
def test_should_sample(when, step, epoch, at_first, n_steps, n_epochs, expected) -> None:
    assert should_sample(when, global_step=step, epoch=epoch, at_first=at_first, every_n_steps=n_steps,
                         every_n_epochs=n_epochs) is expected


# ---------------------------------------------------------------- a sampling point


def test_sampling_point_writes_names_images_and_contact_sheet(components, tmp_path) -> None:
    prompts = [SamplePrompt("a red cube", "blurry", width=64, height=64, steps=1, seed=7),
               SamplePrompt("a blue sphere on a table", width=64, height=96, steps=2, sampler="euler_a")]
    result = sample(components, prompts, tmp_path)
    folder = tmp_path / "sample"
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 3, names
    assert re.fullmatch(r"lora_000012_00_\d{14}_7\.png", names[0])
    random_seed = re.fullmatch(r"lora_000012_01_\d{14}_(\d+)\.png", names[1])
    assert random_seed and int(random_seed.group(1)) == result.seeds[1]
    assert re.fullmatch(r"lora_000012_\d{14}_contact\.png", names[2])
    assert result.images == [folder / names[0], folder / names[1]] and result.contact_sheet == folder / names[2]

    first, second = (Image.open(p) for p in result.images)
    assert first.size == (64, 64) and second.size == (64, 96)
    assert "Seed: 7, Size: 64x64" in first.text["parameters"] and "Negative prompt: blurry" in first.text["parameters"]
    sheet = Image.open(result.contact_sheet)
    assert sheet.width > 2 * 64 and sheet.height > 96
    # Each image appears in the sheet as it is (small images are not enlarged), centred in its 96 px box.
    x, y = 8 + (CONTACT_MIN_WIDTH - 64) // 2, 8 + (96 - 64) // 2
    assert (np.asarray(sheet)[y:y + 64, x:x + 64] == pixels(result.images[0])).all()

    # The recorded seed re-makes the random-seed image exactly, and another seed makes another image;
    # epoch points use e{epoch:06d} names.
    seed = result.seeds[1]
    again = sample(components, [SamplePrompt("a blue sphere on a table", width=64, height=96, steps=2,
                                             sampler="euler_a", seed=s) for s in (seed, seed + 1)],
                   tmp_path, None, 99, epoch=3)
    assert re.fullmatch(rf"e000003_00_\d{{14}}_{seed}\.png", again.images[0].name)
    assert (pixels(again.images[0]) == pixels(result.images[1])).all()
    assert not (pixels(again.images[1]) == pixels(result.images[1])).all()


def test_sampling_leaves_rng_streams_and_modes_alone(components, tmp_path) -> None:
    c = components

    def draws() -> tuple:
        return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()

    # A layer that draws from every global RNG during sampling, as dropout-like code would.
    def consume(module, args, output):
        torch.rand(5), random.random(), np.random.rand(3)

    handle = c.unet.mid_block.register_forward_hook(consume)
    c.unet.train()
    c.unet.conv_in.eval()  # a submodule with its own flag must get it back
    try:
        torch.manual_seed(123), random.seed(123), np.random.seed(123)
        expected = draws()
        torch.manual_seed(123), random.seed(123), np.random.seed(123)
        sample(components, [SamplePrompt("x", width=64, height=64, steps=1, sampler="k_euler_a")], tmp_path,
               epoch=1)
        assert draws() == expected
        assert c.unet.training and not c.unet.conv_in.training and c.unet.mid_block.training
        assert not c.vae.training and not c.text_encoder1.training
    finally:
        handle.remove()
        c.unet.eval()


def test_lora_stays_applied_and_its_dropout_is_off(components, tmp_path) -> None:
    c = components
    network = build_network(c.unet, [c.text_encoder1, c.text_encoder2], network_dim=4, network_alpha=4,
                            dropout=0.5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.5)
    prompt = [SamplePrompt("a red cube", width=64, height=64, steps=2, seed=5)]
    base = sample(components, prompt, tmp_path / "base")
    network.attach()
    try:
        network.train()
        trained = sample(components, prompt, tmp_path / "train", network=network)
        assert network.training
        network.eval()
        evaluated = sample(components, prompt, tmp_path / "eval")
    finally:
        network.detach()
    assert (pixels(trained.images[0]) == pixels(evaluated.images[0])).all()  # dropout was off
    assert not (pixels(trained.images[0]) == pixels(base.images[0])).all()  # the LoRA changed the image


def test_long_and_weighted_prompts_and_autocast(components, tmp_path) -> None:
    """Prompts are encoded in up to three 75-token chunks, like sd-scripts' long-prompt pipeline, and
    A1111 weights change the conditioning."""
    words = ", ".join(f"word{i}" for i in range(40))  # about 120 tokens
    made = sample(components, [SamplePrompt(words + text, width=64, height=64, steps=2, seed=1)
                               for text in (", red", ", blue", ", (blue:1.6)")], tmp_path)
    red, blue, weighted = (pixels(path) for path in made.images)
    assert not (red == blue).all() and not (blue == weighted).all()
    bf16 = sample(components, [SamplePrompt("x", width=64, height=64, steps=1, seed=1)], tmp_path / "bf16",
                  dtype=torch.bfloat16)
    assert Image.open(bf16.images[0]).size == (64, 64)
