"""Shared tiny SDXL models, built once per test session.

The fixtures are session-scoped and shared: do not modify them in place (deep-copy a component before training it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# One thread for every test and every subprocess a test starts: the tiny models' ops are so small that intra-op
# threads cost more than they give (measured 0.15 s vs 1.1 s a step on 2 busy cores).
os.environ["OMP_NUM_THREADS"] = "1"
# Tests make every model they use: the hub is never asked (bitsandbytes' import asks it for a kernel otherwise).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


if TYPE_CHECKING:  # imported inside the fixtures, so test files that do not use them start fast
    from lorakit.models.components import SDXLComponents


@pytest.fixture(scope="session")
def tiny_components() -> SDXLComponents:
    """Random tiny SDXL components (seed 0, fp32)."""
    import torch

    from lorakit.testing.random_models import random_components

    return random_components("tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_single_file(tiny_components: SDXLComponents, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_components` as an fp32 SGM single-file checkpoint (the layout of sd_xl_base_1.0.safetensors)."""
    from lorakit.testing.random_models import write_single_file

    path = tmp_path_factory.mktemp("tiny-single-file") / "tiny-sdxl.safetensors"
    write_single_file(tiny_components, path)
    return path


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tiny_components: SDXLComponents, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_components` as an fp32 diffusers folder (model_index.json, unet/, vae/, text_encoder(_2)/, ...)."""
    from lorakit.testing.random_models import write_diffusers

    folder = tmp_path_factory.mktemp("tiny-diffusers") / "tiny-sdxl"
    write_diffusers(tiny_components, folder)
    return folder


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process: reset it around a test that uses another."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
