"""SDXL models: loading from single files, diffusers folders and hub ids; name maps; tokenizers; text encoding."""

from lorakit.models.components import ModelIdentity, SDXLComponents
from lorakit.models.loading import load_sdxl, load_vae

__all__ = ["ModelIdentity", "SDXLComponents", "load_sdxl", "load_vae"]
