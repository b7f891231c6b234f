"""--network_module: `networks.lora` is lorakit's own network; `lycoris.kohya` is served by lorakit's own modules
(LoRA/LoCon, DoRA, LoHa, LoKr) when the lycoris-lora package is not installed, and by the package when it is;
other modules follow sd-scripts' plug-in contract.

A plug-in module exposes `create_network(multiplier, network_dim, network_alpha, vae, text_encoders, unet,
**kwargs)` and returns a network with sd-scripts' API (`apply_to`, `prepare_optimizer_params`, `load_weights`,
`save_weights`, ...). `PluginNetwork` puts it behind the protocol the trainer talks to (`TrainableNetwork`), which
lorakit's `LoRANetwork` answers directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.network.args import fraction
from lorakit.network.network import LoRANetwork, build_network
from lorakit.network.targets import SDXL_LORA, LoRALayout

LORAKIT_MODULE = "networks.lora"
LYCORIS_MODULE = "lycoris.kohya"
EXTRAS = {"lycoris": "lycoris"}  # top-level package -> lorakit extra that installs it


class TrainableNetwork(Protocol):
    """What the trainer asks of a network, lorakit's own or a plug-in's (besides nn.Module's `state_dict`,
    `load_state_dict`, `parameters`, `train`, `eval` and `to`)."""

    multiplier: float

    def attach(self) -> None:
        """Start changing the models' outputs."""

    def parameter_groups(self, unet_lr: float | None, text_encoder1_lr: float | None,
                         text_encoder2_lr: float | None, learning_rate: float | None) -> list[dict]:
        """Optimizer groups `{"name", "params", "lr"}`."""

    def set_multiplier(self, multiplier: float) -> None:
        """Scale the network's effect (0: the base model)."""

    def load_file(self, path: str | os.PathLike, unet: nn.Module | None, lora: LoRALayout) -> None:
        """--network_weights (a file's names are the family's, `lora`; the U-Net renames SDXL's)."""

    def save_file(self, path: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str]) -> None:
        """Write the network's file completely under `path` (written elsewhere first, then renamed)."""

    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """--scale_weight_norms: (modules scaled, mean norm, max norm)."""


class PluginNetwork:
    """A plug-in's network (sd-scripts' network API) behind `TrainableNetwork`; anything else it is asked for
    (`state_dict`, `parameters`, `to`, ...) is the plug-in network's own."""

    def __init__(self, network: nn.Module, text_encoders: Sequence[nn.Module], unet: nn.Module,
                 train_text_encoder: bool, train_unet: bool) -> None:
        self.network = network
        self._attach = (list(text_encoders), unet, train_text_encoder, train_unet)

    def __getattr__(self, name: str):
        return getattr(self.network, name)

    def attach(self) -> None:
        self.network.apply_to(*self._attach)

    def parameter_groups(self, unet_lr: float | None, text_encoder1_lr: float | None,
                         text_encoder2_lr: float | None, learning_rate: float | None) -> list[dict]:
        result = self.network.prepare_optimizer_params(text_encoder1_lr, unet_lr, learning_rate)
        groups = result[0] if isinstance(result, tuple) else result
        return [{"name": f"group{i}", **(g if isinstance(g, dict) else {"params": list(g)})}
                for i, g in enumerate(groups)]

    def set_multiplier(self, multiplier: float) -> None:
        self.network.set_multiplier(multiplier)

    @property
    def multiplier(self) -> float:
        return getattr(self.network, "multiplier", 1.0)

    def load_file(self, path: str | os.PathLike, unet: nn.Module | None, lora: LoRALayout) -> None:
        self.network.load_weights(str(path))

    def save_file(self, path: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str]) -> None:
        path = Path(path)
        partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # plug-ins write the file themselves
        self.network.save_weights(str(partial), dtype, dict(metadata))
        os.replace(partial, path)

    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        regularize = getattr(self.network, "apply_max_norm_regularization", None)
        if regularize is None:
            raise LorakitError(f"--scale_weight_norms: the {type(self.network).__name__} of this --network_module has "
                               "no apply_max_norm_regularization")
        return regularize(max_norm_value, device)


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
    lora: LoRALayout = SDXL_LORA,
) -> LoRANetwork | Any:
    """Build the network named by --network_module. lorakit's own network gets no modules for parts not trained
    (`lora`: the family's layers and names); a plug-in gets all models and returns its own network (which
    `PluginNetwork` puts behind `TrainableNetwork`)."""
    if served_natively(network_module):
        if network_module == LYCORIS_MODULE:
            network_args, dropout = lycoris_defaults(network_args, network_dim, network_alpha, dropout)
        return build_network(unet, text_encoders, network_dim=network_dim, network_alpha=network_alpha,
                             dropout=dropout, network_args=network_args, multiplier=multiplier,
                             train_unet=train_unet, train_text_encoder=train_text_encoder, lora=lora)
    module = import_network_module(network_module)
    kwargs = dict(network_args or {})
    kwargs.setdefault("dropout", dropout)  # sd-scripts' trainer does the same (a LyCORIS workaround)
    return module.create_network(multiplier, network_dim, network_alpha, vae, list(text_encoders), unet,
                                 neuron_dropout=dropout, **kwargs)


def served_natively(network_module: str | None) -> bool:
    """Whether lorakit's own modules build this --network_module's network."""
    module = network_module or LORAKIT_MODULE
    return module == LORAKIT_MODULE or (module == LYCORIS_MODULE and importlib.util.find_spec("lycoris") is None)


def lycoris_defaults(network_args: Mapping[str, str] | None, network_dim: int | None, network_alpha: float | None,
                     dropout: float | None) -> tuple[dict[str, str], float | None]:
    """LyCORIS' `create_network` defaults (`lycoris/kohya.py`): conv layers at the network's rank and alpha, rank
    dropout without rescaling, and `dropout=` as the rank-activation dropout (what --network_dropout is)."""
    args = dict(network_args or {})
    args.setdefault("conv_dim", str(network_dim or 4))
    args.setdefault("conv_alpha", str(1.0 if network_alpha is None else network_alpha))
    args.setdefault("rank_dropout_scale", "False")
    if "dropout" in args:
        text = args.pop("dropout")
        value = fraction("dropout", text)
        if dropout and value and dropout != value:
            raise LorakitError(f"--network_args dropout={text} and --network_dropout {dropout} disagree: give one")
        dropout = dropout or value or None
    return args, dropout


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
