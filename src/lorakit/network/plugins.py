"""--network_module: `networks.lora` is lorakit's own network; other modules follow sd-scripts' plug-in contract.

A plug-in module exposes `create_network(multiplier, network_dim, network_alpha, vae, text_encoders, unet,
**kwargs)` and returns a network with sd-scripts' API (`apply_to`, `prepare_optimizer_params`, `save_weights`,
...), which lorakit's own network also answers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Mapping, Sequence

from torch import nn

from lorakit.errors import LorakitError
from lorakit.network.network import build_network

LORAKIT_MODULE = "networks.lora"
EXTRAS = {"lycoris": "lycoris"}  # top-level package -> lorakit extra that installs it


def create_network(
    network_module: str,
    *,
    unet: nn.Module,
    text_encoders: Sequence[nn.Module],
    vae: nn.Module | None = None,
    network_dim: int | None = None,
    network_alpha: float | None = None,
    dropout: float | None = None,
    network_args: Mapping[str, str] | None = None,
    multiplier: float = 1.0,
    train_unet: bool = True,
    train_text_encoder: bool = True,
):
    """Build the network named by --network_module. lorakit's own network gets no modules for parts not trained;
    a plug-in gets all models, and the trainer then calls `apply_to(..., apply_text_encoder, apply_unet)`."""
    if network_module == LORAKIT_MODULE:
        return build_network(unet, text_encoders, network_dim=network_dim, network_alpha=network_alpha,
                             dropout=dropout, network_args=network_args, multiplier=multiplier,
                             train_unet=train_unet, train_text_encoder=train_text_encoder)
    module = import_network_module(network_module)
    kwargs = dict(network_args or {})
    kwargs.setdefault("dropout", dropout)  # sd-scripts' trainer does the same (a LyCORIS workaround)
    return module.create_network(multiplier, network_dim, network_alpha, vae, list(text_encoders), unet,
                                 neuron_dropout=dropout, **kwargs)


def import_network_module(name: str):
    """Import a plug-in module; a missing optional package is named with the extra that installs it."""
    top = name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        extra = EXTRAS.get(top)
        hint = f"pip install 'lorakit[{extra}]'" if extra else "install the package that provides it"
        raise LorakitError(f"--network_module={name}: module {top!r} is not installed; {hint}")
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        raise LorakitError(f"--network_module={name}: cannot import it ({error})") from None
    if not callable(getattr(module, "create_network", None)):
        raise LorakitError(f"--network_module={name}: the module has no create_network(multiplier, network_dim, "
                           "network_alpha, vae, text_encoders, unet, **kwargs)")
    return module
