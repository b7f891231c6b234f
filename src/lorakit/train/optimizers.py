"""`--optimizer_type` / `--optimizer_args` → an optimizer, as sd-scripts' `library/train_util.py`
`get_optimizer`.

Names are case-insensitive; anything else is a `torch.optim` class name or a dotted class path (case-sensitive),
called as `Class(param_groups, lr=learning_rate, **optimizer_args)`. Optional packages are imported only when
named; a missing one is reported with the pip extra that installs it.
"""

from __future__ import annotations

import ast
import importlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.errors import LorakitError

log = logging.getLogger(__name__)

# top-level package -> lorakit extra (pyproject.toml [project.optional-dependencies])
EXTRAS = {"bitsandbytes": "bitsandbytes", "prodigyopt": "prodigy", "lion_pytorch": "lion",
          "dadaptation": "dadaptation", "schedulefree": "schedulefree"}

# lower-case name -> (module, class)
NAMED_OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw": ("torch.optim", "AdamW"),
    "sgdnesterov": ("torch.optim", "SGD"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "sgdnesterov8bit": ("bitsandbytes.optim", "SGD8bit"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit"),
    "pagedadamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
    "pagedlion8bit": ("bitsandbytes.optim", "PagedLion8bit"),
    "pagedadamw": ("bitsandbytes.optim", "PagedAdamW"),
    "pagedadamw32bit": ("bitsandbytes.optim", "PagedAdamW32bit"),
    "lion": ("lion_pytorch", "Lion"),
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"),
    "dadaptadam": ("dadaptation", "DAdaptAdam"),
    "dadaptadan": ("dadaptation", "DAdaptAdan"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP"),
    "dadaptlion": ("dadaptation", "DAdaptLion"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD"),
    "prodigy": ("prodigyopt", "Prodigy"),
    "adafactor": ("transformers.optimization", "Adafactor"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree"),
}
_NESTEROV = {"sgdnesterov", "sgdnesterov8bit"}


@dataclass
class BuiltOptimizer:
    """The optimizer and what the rest of the run needs to know about it."""

    optimizer: torch.optim.Optimizer
    optimizer_class: type
    lr: float | None
    constructor_kwargs: dict[str, Any]
    description: str  # ss_optimizer: "module.Class(k=v,...)"
    lr_scheduler: str | None = None  # a scheduler the optimizer forces ("adafactor:<lr>"), else None
    schedule_free: bool = False  # has train()/eval(): toggle around sampling, saving and validation
    warnings: list[str] = field(default_factory=list)

    def make(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """A new optimizer of the same class and settings over other parameter groups (fused backward)."""
        return self.optimizer_class(param_groups, lr=self.lr, **self.constructor_kwargs)


def parse_kwargs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """`key=value` items → kwargs; values are Python literals (`betas=0.9,0.999` is a tuple, strings quoted).
    Split on the first `=` only, so `name='a=b'` works (sd-scripts rejects it)."""
    kwargs: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LorakitError(f"{flag} {item!r}: expected key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError) as error:
            raise LorakitError(f"{flag} {item!r}: value {text!r} is not a Python literal ({error}); "
                               f"quote strings, e.g. {key.strip()}=\"{text.strip()}\"") from None
    return kwargs


def import_attribute(module_name: str, attribute: str, flag: str, value: str) -> Any:
    """`module.attribute`, with a one-line error naming the pip extra when an optional package is missing."""
    package = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if package in EXTRAS and (error.name or package).split(".")[0] == package:
            raise LorakitError(f"{flag} {value} needs the {package} package: "
                               f"pip install 'lorakit[{EXTRAS[package]}]'") from None
        raise LorakitError(f"{flag} {value}: cannot import {module_name} ({error})") from None
    except ImportError as error:
        raise LorakitError(f"{flag} {value}: {module_name} is installed but cannot be imported ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise LorakitError(f"{flag} {value}: {module_name} has no {attribute}") from None


def _optimizer_class(optimizer_type: str) -> type:
    named = NAMED_OPTIMIZERS.get(optimizer_type.lower())
    if named is not None:
        return import_attribute(*named, "--optimizer_type", optimizer_type)
    module_name, dot, class_name = optimizer_type.rpartition(".")
    if not dot:
        if not hasattr(torch.optim, optimizer_type):
            known = ", ".join(cls for _, cls in NAMED_OPTIMIZERS.values())
            raise LorakitError(f"--optimizer_type {optimizer_type}: unknown optimizer; expected one of {known}, "
                               "a torch.optim class name or a dotted class path such as pytorch_optimizer.CAME")
        return getattr(torch.optim, optimizer_type)
    return import_attribute(module_name, class_name, "--optimizer_type", optimizer_type)


def _first_param(param_groups: list[Any]) -> torch.Tensor:
    first = param_groups[0]
    return first["params"][0] if isinstance(first, dict) else first


def check_bitsandbytes_device(optimizer_class: type, device: torch.device, optimizer_type: str) -> None:
    """One real 8-bit step on the parameters' device: bitsandbytes builds differ in which devices they support."""
    probe = torch.nn.Parameter(torch.zeros(4096, device=device))
    probe.grad = torch.ones_like(probe)
    kwargs = {"momentum": 0.9} if optimizer_type.lower() == "sgdnesterov8bit" else {}
    try:
        optimizer_class([probe], lr=1e-3, **kwargs).step()
    except Exception as error:  # noqa: BLE001 - any failure means "cannot run here"; the message says which
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LorakitError(f"--optimizer_type {optimizer_type}: bitsandbytes cannot run on {device.type} here "
                           f"({reason}); use --optimizer_type AdamW") from None


def _warn(messages: list[str], text: str) -> None:
    messages.append(text)
    log.warning(text)


def _group_lrs(param_groups: list[Any], lr: float) -> list[float]:
    return [group.get("lr", lr) if isinstance(group, dict) else lr for group in param_groups]


def build_optimizer(optimizer_type: str | None, param_groups: Iterable[Any], learning_rate: float,
                    optimizer_args: Sequence[str] | None = None, *, lr_scheduler: str = "constant",
                    max_grad_norm: float = 1.0) -> BuiltOptimizer:
    """Build the optimizer named by `--optimizer_type` over `param_groups` (tensors or group dicts)."""
    name = optimizer_type or "AdamW"
    key = name.lower()
    groups = [dict(g) if isinstance(g, dict) else g for g in param_groups]
    if not groups:
        raise LorakitError("no trainable parameters: the network has nothing for the optimizer to train")
    optimizer_kwargs = parse_kwargs(optimizer_args, "--optimizer_args")
    optimizer_class = _optimizer_class(name)
    extra_kwargs: dict[str, Any] = {}
    lr: float | None = learning_rate
    forced_scheduler = None
    warnings: list[str] = []

    if key in _NESTEROV:
        optimizer_kwargs.setdefault("momentum", 0.9)
        extra_kwargs["nesterov"] = True
    elif key.startswith("dadapt") or key == "prodigy":
        lrs = _group_lrs(groups, learning_rate)
        if lrs[0] <= 0.1:
            _warn(warnings, f"--optimizer_type {name}: learning rate {lrs[0]} is low for an adaptive-step "
                            "optimizer; about 1.0 is recommended")
        if len(set(lrs)) > 1:
            _warn(warnings, f"--optimizer_type {name}: several learning rates given; only the first ({lrs[0]}) "
                            "takes effect")
    elif key == "adafactor":
        optimizer_kwargs.setdefault("relative_step", True)
        if not optimizer_kwargs["relative_step"] and optimizer_kwargs.get("warmup_init", False):
            _warn(warnings, "Adafactor: warmup_init=True needs relative_step; relative_step set to True")
            optimizer_kwargs["relative_step"] = True
        if optimizer_kwargs["relative_step"]:
            removed = [g.pop("lr", None) for g in groups if isinstance(g, dict)]
            if any(value is not None for value in removed):
                _warn(warnings, "Adafactor with relative_step: the per-group learning rates (--unet_lr, "
                                "--text_encoder_lr*) are ignored")
            if lr_scheduler not in ("constant", "adafactor") and not lr_scheduler.startswith("adafactor:"):
                _warn(warnings, f"Adafactor with relative_step: --lr_scheduler {lr_scheduler} is replaced by "
                                f"adafactor:{learning_rate}")
            forced_scheduler = f"adafactor:{learning_rate}"
            lr = None
        else:
            if max_grad_norm != 0.0:
                _warn(warnings, "Adafactor without relative_step: --max_grad_norm clips gradients; 0 is "
                                "usually better")
            if lr_scheduler != "constant_with_warmup":
                _warn(warnings, "Adafactor without relative_step: --lr_scheduler constant_with_warmup is "
                                "usually better")
            if optimizer_kwargs.get("clip_threshold", 1.0) != 1.0:
                _warn(warnings, "Adafactor without relative_step: clip_threshold=1.0 is usually better")

    if optimizer_class.__module__.split(".")[0] == "bitsandbytes":
        check_bitsandbytes_device(optimizer_class, _first_param(groups).device, name)
    constructor_kwargs = {**optimizer_kwargs, **extra_kwargs}
    try:
        optimizer = optimizer_class(groups, lr=lr, **constructor_kwargs)
    except TypeError as error:
        raise LorakitError(f"--optimizer_args for {optimizer_class.__name__}: {error}") from None
    schedule_free = callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
    if schedule_free:
        optimizer.train()
    description = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    if optimizer_kwargs:
        description += "(" + ",".join(f"{k}={v}" for k, v in optimizer_kwargs.items()) + ")"
    return BuiltOptimizer(optimizer=optimizer, optimizer_class=optimizer_class, lr=lr,
                          constructor_kwargs=constructor_kwargs, description=description,
                          lr_scheduler=forced_scheduler, schedule_free=schedule_free, warnings=warnings)


def _toggle(optimizer: Any, mode: str) -> None:
    method: Callable[[], Any] | None = getattr(optimizer, mode, None)
    if callable(method):
        method()


def optimizer_train_mode(optimizer: Any) -> None:
    """Schedule-free optimizers: back to training weights (no-op for the others)."""
    _toggle(optimizer, "train")


def optimizer_eval_mode(optimizer: Any) -> None:
    """Schedule-free optimizers: switch to the averaged weights for sampling, saving and validation."""
    _toggle(optimizer, "eval")
