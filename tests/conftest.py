"""Shared tiny SDXL models, built once per test session.

The fixtures are session-scoped and shared: do not modify them in place (deep-copy a component before training it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

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
