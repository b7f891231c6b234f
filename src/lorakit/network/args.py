"""`--network_args` of `networks.lora` (sd-scripts' `networks/lora.py`, `create_network`) and of LyCORIS'
`lycoris.kohya` as lorakit serves it natively, parsed into one typed object.

Values arrive as strings (`key=value`, split on the first `=`). Unlike sd-scripts, an unknown key or a
list of the wrong length is an error naming the key, not silently ignored. `algo` picks the module kind (lora,
dora, loha, lokr; LyCORIS' `locon` is lora, and `dora_wd=True` makes lora a DoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from lorakit.config.train_config import MAX_RANK
from lorakit.errors import LorakitError
from lorakit.network.targets import NUM_BLOCKS

NUM_IN_OUT_BLOCKS = 9  # input_blocks / output_blocks entries of down_lr_weight / up_lr_weight
NUM_MID_BLOCKS = 3
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
MAX_LR_RATIO = 1e6


@dataclass(frozen=True)
class NetworkArgs:
    conv_dim: int | None = None
    conv_alpha: float | None = None
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    down_lr_weight: tuple[float, ...] | None = None
    mid_lr_weight: tuple[float, ...] | None = None
    up_lr_weight: tuple[float, ...] | None = None
    block_lr_zero_threshold: float = 0.0
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    algo: str = "lora"
    dora_wd: bool = False
    factor: int = -1
    rank_dropout_scale: bool = True  # sd-scripts' LoRA rescales by 1/(1-p); LyCORIS' default is not to

    @property
    def kind(self) -> str:
        """The module kind: lora, dora, loha or lokr."""
        return "dora" if self.algo == "lora" and self.dora_wd else self.algo

    @property
    def block_lr_weights(self) -> tuple[float, ...] | None:
        """The 23 per-block LR multipliers (sd-scripts' `get_block_lr_weight`), or None when none was given."""
        if self.down_lr_weight is None and self.mid_lr_weight is None and self.up_lr_weight is None:
            return None

        def thresholded(weights: tuple[float, ...] | None, n: int) -> list[float]:
            if weights is None:
                return [1.0] * n
            return [w if w > self.block_lr_zero_threshold else 0.0 for w in weights]

        return tuple([1.0] + thresholded(self.down_lr_weight, NUM_IN_OUT_BLOCKS)
                     + thresholded(self.mid_lr_weight, NUM_MID_BLOCKS)
                     + thresholded(self.up_lr_weight, NUM_IN_OUT_BLOCKS) + [1.0])

    @property
    def uses_conv(self) -> bool:
        return self.conv_dim is not None or self.conv_block_dims is not None

    def loraplus_ratio(self, part: str) -> float | None:
        """LoRA+ ratio for `unet` or a text encoder: the specific ratio overrides the general one."""
        specific = self.loraplus_unet_lr_ratio if part == "unet" else self.loraplus_text_encoder_lr_ratio
        return specific or self.loraplus_lr_ratio


@dataclass(frozen=True)
class RankPlan:
    """Rank and alpha per U-Net block for Linear/1x1 and for 3x3 layers; text encoders use the base pair."""

    dim: int
    alpha: float | None
    conv_dim: int | None
    conv_alpha: float | None
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None

    def for_layer(self, block: int, conv3x3: bool, unet: bool) -> tuple[int, float | None]:
        """(rank, alpha) of a layer; rank 0 means no LoRA module there."""
        if unet and self.block_dims is not None:
            if not conv3x3:
                return self.block_dims[block], self.block_alphas[block]
            if self.conv_block_dims is None:
                return 0, None
            return self.conv_block_dims[block], self.conv_block_alphas[block]
        if not conv3x3:
            return self.dim, self.alpha
        return (self.conv_dim or 0), self.conv_alpha


def rank_plan(args: NetworkArgs, network_dim: int | None, network_alpha: float | None) -> RankPlan:
    """sd-scripts' dim/alpha resolution: defaults, per-block lists, and blocks whose LR weight is 0 removed."""
    dim = 4 if network_dim is None else network_dim
    alpha = 1.0 if network_alpha is None else network_alpha
    conv_alpha = (1.0 if args.conv_alpha is None else args.conv_alpha) if args.conv_dim is not None else None
    lr_weights = args.block_lr_weights
    if args.block_dims is None and lr_weights is None:
        return RankPlan(dim, alpha, args.conv_dim, conv_alpha)
    block_dims = list(args.block_dims or [dim] * NUM_BLOCKS)
    block_alphas = args.block_alphas or (alpha,) * NUM_BLOCKS
    conv_block_dims = list(args.conv_block_dims) if args.conv_block_dims is not None else (
        [args.conv_dim] * NUM_BLOCKS if args.conv_dim is not None else None)
    if args.conv_block_dims is not None:
        default_conv_alpha = 1.0 if args.conv_alpha is None else args.conv_alpha
        conv_block_alphas = args.conv_block_alphas or (default_conv_alpha,) * NUM_BLOCKS
    else:
        conv_block_alphas = (conv_alpha,) * NUM_BLOCKS if args.conv_dim is not None else None
    for index, weight in enumerate(lr_weights or ()):
        if weight == 0:
            block_dims[index] = 0
            if conv_block_dims is not None:
                conv_block_dims[index] = 0
    return RankPlan(dim, alpha, args.conv_dim, conv_alpha, tuple(block_dims), tuple(block_alphas),
                    tuple(conv_block_dims) if conv_block_dims is not None else None, conv_block_alphas)


BLOCK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
              "up_lr_weight", "block_lr_zero_threshold")


def parse_network_args(values: Mapping[str, str] | None, block_args: bool = True) -> NetworkArgs:
    """Parse `--network_args` values (already split into a dict of strings) for `networks.lora`. Without
    `block_args` (a family whose blocks are not SDXL's) the block-wise keys are refused."""
    fields: dict[str, object] = {}
    for key, text in (values or {}).items():
        if key in BLOCK_KEYS and not block_args:
            raise LorakitError(f"--network_args {key}: block-wise ranks and learning rates follow SDXL's 23 U-Net "
                               "blocks; lorakit does not apply them to this model family yet")
        if key in NOT_BUILT:
            _refuse_unless_default(key, str(text).strip())
            continue
        parser = _PARSERS.get(key)
        if parser is None:
            hint = "; use --network_dropout" if key in ("dropout", "neuron_dropout") else ""
            raise LorakitError(f"--network_args: unknown key {key!r} for networks.lora{hint}; "
                               f"expected one of {', '.join(sorted(_PARSERS))}")
        fields[key] = parser(key, str(text).strip())
    args = NetworkArgs(**fields)
    _check_kind(args)
    return args


# LyCORIS keys lorakit's native modules do not build: refused by name rather than ignored.
NOT_BUILT = {
    **{key: "Tucker-decomposed convolutions are not built natively"
       for key in ("use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp")},
    "use_scalar": "the trained scalar is not built natively",
    "decompose_both": "LoKr with both factors decomposed is not built natively",
    "rs_lora": "rank-stabilised scaling is not built natively",
    "bypass_mode": "lorakit's modules always add their branch to the layer's output",
    "preset": "lorakit's native modules train networks.lora's layers (conv layers with conv_dim)",
    "train_norm": "normalisation layers are not trained natively",
    "wd_on_output": "DoRA's magnitude is per output channel, as LyCORIS' default",
    "full_matrix": "LoKr keeps w2 whole only where its rank would not save anything, as LyCORIS decides",
    "unbalanced_factorization": "LoKr factors are balanced, as LyCORIS' default",
    "constraint": "OFT is not built natively", "rescaled": "OFT is not built natively",
}


def _check_kind(args: NetworkArgs) -> None:
    if args.dora_wd and args.algo not in ("lora", "dora"):
        raise LorakitError(f"--network_args dora_wd=True: DoRA is built on LoRA (algo=lora dora_wd=True or "
                           f"algo=dora), not on algo={args.algo}")
    if args.factor != -1 and args.kind != "lokr":
        raise LorakitError(f"--network_args factor={args.factor}: the Kronecker factor applies to algo=lokr only")


def _algo(key: str, text: str) -> str:
    algo = {"locon": "lora"}.get(text.lower(), text.lower())
    if algo not in ("lora", "dora", "loha", "lokr"):
        hint = " (install lycoris-lora and use --network_module lycoris.kohya for it)" if text.lower() in (
            "ia3", "oft", "boft", "glora", "full", "diag-oft", "dylora", "tlora") else ""
        raise LorakitError(f"--network_args algo={text!r}: expected lora, locon, dora, loha or lokr{hint}")
    return algo


def _boolean(key: str, text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise LorakitError(f"--network_args {key}={text!r}: expected True or False")
    return text.lower() in ("true", "1")


def _factor(key: str, text: str) -> int:
    value = _number(key, text, int, -1, MAX_RANK)
    if value == 0:
        raise LorakitError(f"--network_args {key}=0: expected -1 (the most balanced split) or a positive factor")
    return value


LYCORIS_TRUE_BY_DEFAULT = ("disable_conv_cp", "wd_on_output")


def _refuse_unless_default(key: str, text: str) -> None:
    """A LyCORIS switch at its default value asks for nothing; any other value is refused."""
    default = "true" if key in LYCORIS_TRUE_BY_DEFAULT else "false"
    if text.lower() in (default, {"true": "1", "false": "0"}[default]):
        return
    raise LorakitError(f"--network_args {key}={text}: {NOT_BUILT[key]} (install lycoris-lora and use "
                       "--network_module lycoris.kohya for it)")


def _number(key: str, text: str, kind: type, low: float = 0, high: float = math.inf) -> int | float:
    """An integer or a finite float from `low` to `high` (every value of these arguments is a size, a ratio or a
    weight: none is negative)."""
    bounds = f"of at least {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
    expected = f"{'an integer' if kind is int else 'a number'} {bounds}"
    try:
        value = kind(text)
    except ValueError:
        raise LorakitError(f"--network_args {key}={text!r}: expected {expected}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise LorakitError(f"--network_args {key}={text!r}: expected {expected}")
    return value


def _rank(key: str, text: str) -> int:
    return _number(key, text, int, 1, MAX_RANK)


def _float(key: str, text: str) -> float:
    return _number(key, text, float)


def _ratio(key: str, text: str) -> float:
    """A LoRA+ learning-rate ratio (16 is typical; beyond a million the learning rate itself breaks)."""
    return _number(key, text, float, 0, MAX_LR_RATIO)


def fraction(key: str, text: str) -> float:
    """A dropout probability (also LyCORIS' `dropout=` of `lycoris.kohya`)."""
    value = _float(key, text)
    if not 0 <= value < 1:
        raise LorakitError(f"--network_args {key}={text}: expected a probability in [0, 1)")
    return value


def _block_list(kind: type):
    """One value per block; a rank of 0 means no module in that block."""
    def parse(key: str, text: str) -> tuple:
        items = text.split(",")
        if len(items) != NUM_BLOCKS:
            raise LorakitError(f"--network_args {key}: expected {NUM_BLOCKS} comma-separated values (one per SDXL "
                               f"block: embedding, 9 input, 3 middle, 9 output, out), got {len(items)}")
        return tuple(_number(key, item.strip(), kind, 0, MAX_RANK if kind is int else math.inf) for item in items)
    return parse


def _lr_weights(count: int, presets: bool):
    def parse(key: str, text: str) -> tuple[float, ...]:
        name, _, base = text.partition("+")
        if presets and name in LR_WEIGHT_PRESETS:
            return lr_weight_preset(name, _float(key, base) if base else 0.0, count)
        if presets and "," not in text and not _is_number(text):
            raise LorakitError(f"--network_args {key}={text!r}: expected {count} comma-separated numbers or a "
                               f"preset ({', '.join(LR_WEIGHT_PRESETS)}, optionally with +base)")
        items = [(_float(key, item.strip()) if item.strip() else 0.0) for item in text.split(",")]
        if len(items) != count:
            raise LorakitError(f"--network_args {key}: expected {count} comma-separated values, got {len(items)}")
        return tuple(items)
    return parse


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def lr_weight_preset(name: str, base: float, count: int = NUM_IN_OUT_BLOCKS) -> tuple[float, ...]:
    """sd-scripts' presets for down/up LR weights (shallow -> deep for down, deep -> shallow for up)."""
    steps = range(count)
    curve = {
        "cosine": [math.sin(math.pi * (i / (count - 1)) / 2) for i in reversed(steps)],
        "sine": [math.sin(math.pi * (i / (count - 1)) / 2) for i in steps],
        "linear": [i / (count - 1) for i in steps],
        "reverse_linear": [i / (count - 1) for i in reversed(steps)],
        "zeros": [0.0] * count,
    }[name]
    return tuple(value + base for value in curve)


_PARSERS = {
    "conv_dim": _rank,
    "conv_alpha": _float,
    "block_dims": _block_list(int),
    "block_alphas": _block_list(float),
    "conv_block_dims": _block_list(int),
    "conv_block_alphas": _block_list(float),
    "down_lr_weight": _lr_weights(NUM_IN_OUT_BLOCKS, presets=True),
    "mid_lr_weight": _lr_weights(NUM_MID_BLOCKS, presets=False),
    "up_lr_weight": _lr_weights(NUM_IN_OUT_BLOCKS, presets=True),
    "block_lr_zero_threshold": _float,
    "rank_dropout": fraction,
    "module_dropout": fraction,
    "loraplus_lr_ratio": _ratio,
    "loraplus_unet_lr_ratio": _ratio,
    "loraplus_text_encoder_lr_ratio": _ratio,
    "algo": _algo,
    "dora_wd": _boolean,
    "rank_dropout_scale": _boolean,
    "factor": _factor,
}
