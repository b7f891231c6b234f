"""The SDXL LoRA network (compatible with sd-scripts' `networks/lora.py`): its modules, groups and the sd-scripts API.

Modules are registered under their `lora_name`, so `network.state_dict()` is the file's tensor dict.
Besides lorakit's own methods the network answers sd-scripts' network API (`apply_to`,
`prepare_optimizer_params`, `save_weights`, ...) so the trainer drives it and a plug-in network alike.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from lorakit.network.args import NetworkArgs, RankPlan, parse_network_args, rank_plan
from lorakit.network.io import load_network_weights, save_network
from lorakit.errors import LorakitError
from lorakit.network.module import ALGOS, AdapterModule, ModuleSpec, delta_weight
from lorakit.network.targets import SDXL_LORA, LoRALayout, Target, block_index

logger = logging.getLogger(__name__)

PART_GROUP_NAMES = {"te": "textencoder", "te1": "textencoder1", "te2": "textencoder2", "unet": "unet"}


class LoRANetwork(nn.Module):
    def __init__(self, loras: Sequence[AdapterModule], parts: Mapping[str, str], args: NetworkArgs = NetworkArgs(),
                 multiplier: float = 1.0) -> None:
        super().__init__()
        self.args = args
        self.multiplier = multiplier
        self._parts = dict(parts)  # lora_name -> "unet" / "te1" / "te2"
        for lora in loras:
            self.add_module(lora.lora_name, lora)

    # -- lorakit API ------------------------------------------------------------------------------------------

    @property
    def loras(self) -> list[AdapterModule]:
        """Every module, whatever its kind (LoRA, DoRA, LoHa, LoKr)."""
        return [module for module in self.children() if isinstance(module, AdapterModule)]

    @property
    def kinds(self) -> set[str]:
        return {lora.algo for lora in self.loras}

    def part_of(self, lora: AdapterModule) -> str:
        return self._parts[lora.lora_name]

    def loras_of(self, part: str) -> list[AdapterModule]:
        return [lora for lora in self.loras if self._parts[lora.lora_name] == part]

    def module_counts(self) -> str:
        """"U-Net 722, text encoder 1 72, text encoder 2 192" (the start-up summary's line)."""
        names = {"unet": "U-Net", "te": "text encoder", "te1": "text encoder 1", "te2": "text encoder 2"}
        parts = [part for part in names if part in set(self._parts.values())] or ["unet"]
        return ", ".join(f"{names[part]} {len(self.loras_of(part))}" for part in parts)

    def attach(self) -> None:
        """Hook every module onto its base layer (idempotent)."""
        for lora in self.loras:
            lora.attach()

    def detach(self) -> None:
        for lora in self.loras:
            lora.detach()

    def set_multiplier(self, multiplier: float) -> None:
        """Scale every branch at run time; 0 turns the LoRA off (base-model outputs)."""
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def merge(self) -> None:
        """Merge every branch into the base weights (at the current multiplier) and detach."""
        for lora in self.loras:
            lora.merge()

    def unmerge(self) -> None:
        """Take merged branches back out of the base weights and attach again."""
        for lora in self.loras:
            lora.unmerge()

    def parameter_groups(self, unet_lr: float | None, text_encoder1_lr: float | None,
                         text_encoder2_lr: float | None, learning_rate: float | None) -> list[dict]:
        """Optimizer groups, each `{"name", "params", "lr"}`; names are sd-scripts' `lr/<name>` log keys.

        TE1, TE2 (SD 1.x/2.x: the one text encoder, at TE1's LR) and the U-Net get their own groups (LR falls back
        to `learning_rate`), LoRA+ puts the `lora_up`
        weights in a "<name> plus" group at LR x ratio, block LR weights give one `unet_block<i>` group per
        block. A group whose LR is 0 (or None) is dropped and its parameters frozen.
        """
        groups: list[dict] = []
        for part, lr in (("te", text_encoder1_lr), ("te1", text_encoder1_lr), ("te2", text_encoder2_lr),
                         ("unet", unet_lr)):
            lr = learning_rate if lr is None else lr
            loras = self.loras_of(part)
            if not loras:
                continue
            weights = self.args.block_lr_weights if part == "unet" else None
            if weights is None:
                groups += _lora_groups(PART_GROUP_NAMES[part], loras, lr, self.args.loraplus_ratio(part))
                continue
            blocks: dict[int, list[AdapterModule]] = {}
            for lora in loras:
                blocks.setdefault(block_index(lora.lora_name), []).append(lora)
            for block, block_loras in sorted(blocks.items()):
                block_lr = None if lr is None else lr * weights[block]
                groups += _lora_groups(f"unet_block{block}", block_loras, block_lr, self.args.loraplus_ratio(part))
        kept = {id(p) for group in groups for p in group["params"]}
        for param in self.parameters():
            param.requires_grad_(id(param) in kept)
        return groups

    # -- sd-scripts network API (what train_network.py calls on any network module) -----------------------------

    def apply_to(self, text_encoders=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        for part, keep in (("te1", apply_text_encoder), ("te2", apply_text_encoder), ("unet", apply_unet)):
            if not keep:
                for lora in self.loras_of(part):
                    delattr(self, lora.lora_name)
        self.attach()

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        te_lrs = (te_lrs + te_lrs)[:2] if te_lrs else [None, None]
        groups = self.parameter_groups(unet_lr, te_lrs[0], te_lrs[1], default_lr)
        return [{"params": g["params"], "lr": g["lr"]} for g in groups], [g["name"] for g in groups]

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def on_step_start(self, *args) -> None:
        """Nothing to do per step (sd-scripts' trainer calls it on every network)."""

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA branches are checkpointed with the blocks that hold their base layers."""

    def is_mergeable(self) -> bool:
        return True

    def load_weights(self, file: str):
        return load_network_weights(self, file)

    def load_file(self, path, unet: nn.Module | None = None, lora: LoRALayout = SDXL_LORA) -> None:
        """`TrainableNetwork.load_file`: --network_weights, with a warning for tensors on one side only."""
        report = load_network_weights(self, path, unet, lora)
        if report.missing:
            logger.warning("--network_weights: %d tensors of the network are not in the file (first: %s)",
                           len(report.missing), report.missing[0])
        if report.unexpected:
            logger.warning("--network_weights: %d tensors of the file are not in the network (first: %s)",
                           len(report.unexpected), report.unexpected[0])

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: Mapping[str, str] | None) -> None:
        save_network(self, file, dtype=dtype, metadata=metadata)

    def save_file(self, path, dtype: torch.dtype | None, metadata: Mapping[str, str]) -> None:
        """`TrainableNetwork.save_file`: sd-scripts' file, written atomically."""
        save_network(self, path, dtype=dtype, metadata=metadata)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """sd-scripts' `--scale_weight_norms`: scale up and down so each ‖ΔW‖ ≤ max_norm; (count, mean, max)."""
        scaled, norms = 0, []
        for lora in self.loras:
            norm = delta_weight(lora.lora_down.weight.to(device), lora.lora_up.weight.to(device), lora.scale).norm()
            clamped = norm.clamp(min=max_norm_value / 2)
            ratio = (clamped.clamp(max=max_norm_value) / clamped).cpu()
            if ratio != 1:
                scaled += 1
                lora.lora_up.weight.mul_(ratio.sqrt().to(lora.lora_up.weight.device))
                lora.lora_down.weight.mul_(ratio.sqrt().to(lora.lora_down.weight.device))
            norms.append(float(norm * ratio))
        return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


def _lora_groups(name: str, loras: Sequence[AdapterModule], lr: float | None, plus_ratio: float | None) -> list[dict]:
    plain = [p for lora in loras for key, p in lora.named_parameters() if not (plus_ratio and "lora_up" in key)]
    plus = [lora.lora_up.weight for lora in loras] if plus_ratio else []
    groups = []
    plus_lr = lr * plus_ratio if lr and plus_ratio else lr
    for group_name, params, group_lr in ((name, plain, lr), (f"{name} plus", plus, plus_lr)):
        if not params:
            continue
        if not group_lr:
            logger.info("learning rate 0 for %s: its %d tensors are frozen", group_name, len(params))
            continue
        groups.append({"name": group_name, "params": params, "lr": group_lr})
    return groups


def build_network(
    unet: nn.Module | None,
    text_encoders: Sequence[nn.Module] = (),
    *,
    network_dim: int | None = None,
    network_alpha: float | None = None,
    dropout: float | None = None,
    network_args: Mapping[str, str] | NetworkArgs | None = None,
    multiplier: float = 1.0,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    modules: Mapping[str, ModuleSpec] | None = None,
    lora: LoRALayout = SDXL_LORA,
) -> LoRANetwork:
    """Create the modules for a family's models (not yet attached; call `network.attach()`); `lora` is the
    family's layers and names (SDXL's by default).

    `modules` (lora_name -> kind, rank, alpha) builds exactly the modules a file holds (`--dim_from_weights`);
    otherwise the kind comes from `network_args` (algo, dora_wd, factor) and ranks from `network_dim`/`network_alpha`
    and `network_args`. Parts that are not trained get no modules at all.
    """
    args = network_args if isinstance(network_args, NetworkArgs) else parse_network_args(network_args,
                                                                                         lora.block_args)
    plan = rank_plan(args, network_dim, network_alpha)
    targets = lora.targets(unet if train_unet else None, text_encoders if train_text_encoder else [],
                           modules is not None or args.uses_conv)
    options = {"multiplier": multiplier, "dropout": dropout, "rank_dropout": args.rank_dropout,
               "module_dropout": args.module_dropout, "rank_dropout_scale": args.rank_dropout_scale}
    loras, parts = [], {}
    for target in targets:
        if modules is not None:
            spec = modules.get(target.lora_name)
            if spec is None:
                continue
            loras.append(spec.build(target.lora_name, target.module, **options))
        else:
            rank, alpha = _planned(plan, target)
            if not rank:
                continue
            kind_options = {"factor": args.factor} if args.kind == "lokr" else {}
            loras.append(ALGOS[args.kind](target.lora_name, target.module, rank, alpha, **options, **kind_options))
        parts[target.lora_name] = target.part
    check_kinds(args, {lora.algo for lora in loras}, dropout, from_file=modules is not None)
    return LoRANetwork(loras, parts, args, multiplier)


def check_kinds(args: NetworkArgs, kinds: set[str], dropout: float | None, from_file: bool) -> None:
    """What the options ask of the modules built (a --dim_from_weights file decides their kinds)."""
    weight_kinds = sorted(kinds & {"loha", "lokr"})
    if dropout and weight_kinds:
        raise LorakitError(f"--network_dropout drops LoRA's rank activations; {weight_kinds[0]} modules build the "
                           "weight change instead (use --network_args rank_dropout= or module_dropout=)")
    if weight_kinds and any((args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio,
                             args.loraplus_text_encoder_lr_ratio)):
        raise LorakitError(f"--network_args loraplus_*: LoRA+ raises the rate of LoRA's up matrices; the "
                           f"{weight_kinds[0]} modules have none")
    if from_file and (args.kind != "lora" or args.factor != -1) and kinds != {args.kind}:
        raise LorakitError(f"--network_args algo={args.kind}: the --dim_from_weights file holds "
                           f"{', '.join(sorted(kinds))} modules, which it decides")


def _planned(plan: RankPlan, target: Target) -> tuple[int, float | None]:
    return plan.for_layer(target.block, target.uses_conv_rank, target.part == "unet")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                   unet, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """sd-scripts' `networks.lora.create_network` signature, for callers that expect it."""
    if text_encoders is not None and not isinstance(text_encoders, (list, tuple)):
        text_encoders = [text_encoders]
    kwargs.pop("dropout", None)  # sd-scripts' trainer injects it for LyCORIS; networks.lora has neuron_dropout
    return build_network(unet, text_encoders or (), network_dim=network_dim, network_alpha=network_alpha,
                         dropout=neuron_dropout, network_args={k: v for k, v in kwargs.items() if v is not None},
                         multiplier=multiplier)
