"""Model families (docs/model-families.md): `family_named("sdxl")` gives the adapter the trainer talks to.

Each family is one module (`lorakit.families.sdxl`, `lorakit.families.sd1`), imported only when asked for; this
registry imports nothing heavy, so the flag table can take its names from it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorakit.families.base import ModelFamily

# --model_family name -> (module, class, arguments)
FAMILIES = {
    "sdxl": ("lorakit.families.sdxl", "SDXL", {}),
    "sd1": ("lorakit.families.sd1", "StableDiffusion", {"v2": False}),
    "sd2": ("lorakit.families.sd1", "StableDiffusion", {"v2": True}),
}


def family_named(name: str) -> ModelFamily:
    module, cls, arguments = FAMILIES[name]
    return getattr(importlib.import_module(module), cls)(**arguments)


__all__ = ["FAMILIES", "family_named"]
