"""The LDM/SGM U-Net of SDXL and SD 1.x/2.x: diffusers configs, shape inference and the SGM <-> diffusers name map.

Single-file checkpoints (and sd-scripts' LoRA names) use Stability's SGM module names (`input_blocks.N.M`,
`middle_block.M`, `output_blocks.N.M`); lorakit runs diffusers' `UNet2DConditionModel`. The map between the two is
derived from the config, so it holds for any number of levels, ResNets per level and transformer depths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from lorakit.errors import LorakitError

HEAD_DIM = 64  # SDXL's heads are 64 wide; checkpoints do not store the head count.
ADDED_TIME_DIM = 256  # width of each of the six size/crop embeddings in SDXL's added condition

# diffusers ResnetBlock2D leaf -> SGM ResBlock leaf
_RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Leaves of one BasicTransformerBlock; the names are the same in both layouts.
_TRANSFORMER_BLOCK_LEAVES = (
    "norm1",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "norm2",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "norm3",
    "ff.net.0.proj",
    "ff.net.2",
)


def _heads(channels: int) -> int:
    return max(1, channels // HEAD_DIM)


def _sdxl_like_config(
    channels: list[int],
    depths: list[int],
    attention: list[bool],
    *,
    layers_per_block: int,
    cross_attention_dim: int,
    adm_in_channels: int,
    in_channels: int = 4,
    out_channels: int = 4,
    use_linear_projection: bool = True,
    sample_size: int = 128,
) -> dict:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(channels),
        "layers_per_block": layers_per_block,
        "transformer_layers_per_block": list(depths),
        # diffusers' `attention_head_dim` is, despite its name, the number of heads (its SDXL config says [5, 10, 20]).
        "attention_head_dim": [_heads(c) for c in channels],
        "cross_attention_dim": cross_attention_dim,
        "norm_num_groups": 32,
        "use_linear_projection": use_linear_projection,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDED_TIME_DIM,
        "projection_class_embeddings_input_dim": adm_in_channels,
    }


def unet_config(size: Literal["tiny", "full"]) -> dict:
    """Keyword arguments for diffusers `UNet2DConditionModel(**config)`: the real SDXL base U-Net, or a tiny one."""
    if size == "full":
        return _sdxl_like_config(
            [320, 640, 1280], [1, 2, 10], [False, True, True],
            layers_per_block=2, cross_attention_dim=2048, adm_in_channels=2816,
        )
    if size == "tiny":
        return _sdxl_like_config(
            [32, 64, 128], [1, 1, 2], [False, True, True],
            layers_per_block=2, cross_attention_dim=128, adm_in_channels=64 + 6 * ADDED_TIME_DIM, sample_size=32,
        )
    raise LorakitError(f"unknown model size {size!r}; expected 'tiny' or 'full'")


def _levels(config: Mapping) -> tuple[list[int], int, list[int], list[bool]]:
    """(channels, layers per block, transformer depth, has attention) per level, from a diffusers U-Net config."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    depths = config.get("transformer_layers_per_block", 1)
    depths = [depths] * len(channels) if isinstance(depths, int) else list(depths)
    attention = ["CrossAttn" in t for t in config["down_block_types"]]
    mirrored = ["CrossAttn" in t for t in reversed(config["up_block_types"])]
    if not isinstance(layers, int) or mirrored != attention or config.get("reverse_transformer_layers_per_block"):
        raise LorakitError(
            "U-Net config: only uniform layers_per_block and up blocks mirroring the down blocks are supported"
        )
    return channels, layers, depths, attention


def _resnet(paths: dict[str, str], diffusers: str, sgm: str, *, shortcut: bool) -> None:
    for d_leaf, s_leaf in _RESNET_LEAVES.items():
        if d_leaf != "conv_shortcut" or shortcut:
            paths[f"{diffusers}.{d_leaf}"] = f"{sgm}.{s_leaf}"


def _transformer(paths: dict[str, str], diffusers: str, sgm: str, *, depth: int) -> None:
    leaves = ["norm", "proj_in", "proj_out"]
    leaves += [f"transformer_blocks.{k}.{leaf}" for k in range(depth) for leaf in _TRANSFORMER_BLOCK_LEAVES]
    for leaf in leaves:
        paths[f"{diffusers}.{leaf}"] = f"{sgm}.{leaf}"


def unet_module_paths(config: Mapping) -> dict[str, str]:
    """diffusers module path -> SGM module path, for every module of the U-Net that directly holds parameters."""
    channels, layers, depths, attention = _levels(config)
    levels = len(channels)
    paths = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    if config.get("addition_embed_type"):  # SDXL's pooled-text and size embedding; SD 1.x/2.x have none
        paths |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

    n = 1
    previous = channels[0]
    for i in range(levels):
        for j in range(layers):
            shortcut = j == 0 and previous != channels[i]
            _resnet(paths, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", shortcut=shortcut)
            if attention[i]:
                _transformer(paths, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", depth=depths[i])
            n += 1
        previous = channels[i]
        if i < levels - 1:
            paths[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1

    _resnet(paths, "mid_block.resnets.0", "middle_block.0", shortcut=False)
    _transformer(paths, "mid_block.attentions.0", "middle_block.1", depth=depths[-1])
    _resnet(paths, "mid_block.resnets.1", "middle_block.2", shortcut=False)

    n = 0
    for u in range(levels):
        i = levels - 1 - u  # the down level this up level mirrors
        for j in range(layers + 1):
            # Every up ResNet takes a skip connection concatenated to its input, so it always has a shortcut.
            _resnet(paths, f"up_blocks.{u}.resnets.{j}", f"output_blocks.{n}.0", shortcut=True)
            if attention[i]:
                _transformer(paths, f"up_blocks.{u}.attentions.{j}", f"output_blocks.{n}.1", depth=depths[i])
            if j == layers and u < levels - 1:
                index = 2 if attention[i] else 1
                paths[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{n}.{index}.conv"
            n += 1
    return paths


def _rename(state: Mapping[str, Tensor], module_map: Mapping[str, str], what: str) -> dict[str, Tensor]:
    """Rename every key's module part through `module_map`, reading each tensor once."""
    renamed: dict[str, Tensor] = {}
    seen: set[str] = set()
    for key in state.keys():
        module, _, param = key.rpartition(".")
        target = module_map.get(module)
        if target is None:
            raise LorakitError(f"{what}: unexpected key {key!r}; it does not fit the U-Net shape of this checkpoint")
        seen.add(module)
        renamed[f"{target}.{param}"] = state[key]
    missing = [m for m in module_map if m not in seen]
    if missing:
        raise LorakitError(f"{what}: no weights for module {missing[0]!r} ({len(missing)} modules missing)")
    return renamed


def unet_to_sgm(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """diffusers `UNet2DConditionModel.state_dict()` keys -> SGM keys (without `UNET_PREFIX`)."""
    return _rename(state, unet_module_paths(config), "diffusers U-Net")


def unet_to_diffusers(sgm: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """SGM U-Net keys (without `UNET_PREFIX`) -> diffusers `UNet2DConditionModel` state-dict keys."""
    to_diffusers = {s: d for d, s in unet_module_paths(config).items()}
    return _rename(sgm, to_diffusers, "SGM U-Net")


def _count(shapes: Mapping[str, tuple[int, ...]], template: str) -> int:
    """How many consecutive indices k (from 0) have `template.format(k)` among the keys."""
    k = 0
    while template.format(k) in shapes:
        k += 1
    return k


def unet_config_from_sgm(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Infer the diffusers config of an SGM U-Net (keys without `UNET_PREFIX`) from its tensor shapes alone."""
    layout = _ldm_layout(shapes)
    if "label_emb.0.0.weight" not in shapes:
        raise LorakitError(
            f"U-Net has no label_emb (SDXL's size/pooled-text embedding), cross-attention width "
            f"{layout.cross_attention_dim}: this looks like SD 1.x/2.x, not SDXL"
        )
    config = _sdxl_like_config(
        layout.channels, layout.depths, layout.attention,
        layers_per_block=layout.layers,
        cross_attention_dim=layout.cross_attention_dim,
        adm_in_channels=shapes["label_emb.0.0.weight"][1],
        in_channels=layout.in_channels,
        out_channels=layout.out_channels,
        use_linear_projection=layout.linear_projection,
    )
    return _checked(config, shapes, "SDXL-like")


def sd_unet_config_from_ldm(shapes: Mapping[str, tuple[int, ...]], heads: int | None) -> dict:
    """The diffusers config of an SD 1.x/2.x LDM U-Net (keys without `UNET_PREFIX`) from its shapes: `heads` is the
    head count of every level (SD 1.x: 8), or None for 64-wide heads (SD 2.x); checkpoints store neither."""
    layout = _ldm_layout(shapes)
    if "label_emb.0.0.weight" in shapes:
        raise LorakitError("U-Net has a label_emb (SDXL's size/pooled-text embedding): this is SDXL, not SD 1.x/2.x")
    config = sd_unet_config(layout.channels, layout.attention, layers_per_block=layout.layers,
                            cross_attention_dim=layout.cross_attention_dim, heads=heads,
                            use_linear_projection=layout.linear_projection, in_channels=layout.in_channels,
                            out_channels=layout.out_channels)
    return _checked(config, shapes, "SD 1.x/2.x")


def sd_unet_config(channels: list[int], attention: list[bool], *, layers_per_block: int, cross_attention_dim: int,
                   heads: int | None, use_linear_projection: bool, in_channels: int = 4, out_channels: int = 4,
                   sample_size: int = 64) -> dict:
    """Keyword arguments for diffusers `UNet2DConditionModel(**config)` in SD 1.x/2.x's layout: one transformer per
    attention level and in the middle, no added embedding."""
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(channels),
        "layers_per_block": layers_per_block,
        "attention_head_dim": heads if heads is not None else [_heads(c) for c in channels],
        "cross_attention_dim": cross_attention_dim,
        "norm_num_groups": 32,
        "use_linear_projection": use_linear_projection,
    }


@dataclass(frozen=True)
class _LDMLayout:
    """What an LDM/SGM U-Net's tensor shapes say about its levels."""

    in_channels: int
    out_channels: int
    channels: list[int]
    depths: list[int]  # transformer depth per level, the middle block's for the last (diffusers' convention)
    layers: int
    attention: list[bool]
    cross_attention_dim: int
    linear_projection: bool


def _ldm_layout(shapes: Mapping[str, tuple[int, ...]]) -> _LDMLayout:
    if "input_blocks.0.0.weight" not in shapes or "out.2.weight" not in shapes:
        raise LorakitError("U-Net: no input_blocks.0.0.weight / out.2.weight; this is not an SGM/LDM U-Net")
    in_channels = shapes["input_blocks.0.0.weight"][1]
    out_channels = shapes["out.2.weight"][0]

    # Walk input blocks: ResNets (`.0.in_layers`), with an optional transformer (`.1`), then a downsampler (`.0.op`).
    channels: list[int] = []
    depths: list[int] = []
    layers: list[int] = []
    n = 1
    while f"input_blocks.{n}.0.in_layers.0.weight" in shapes:
        level_depths = []
        while f"input_blocks.{n}.0.in_layers.0.weight" in shapes:
            level_channels = shapes[f"input_blocks.{n}.0.out_layers.3.weight"][0]
            level_depths.append(_count(shapes, f"input_blocks.{n}.1.transformer_blocks.{{}}.attn1.to_q.weight"))
            n += 1
        if len(set(level_depths)) != 1:
            raise LorakitError(f"U-Net: transformer depths {level_depths} differ within level {len(channels)}")
        channels.append(level_channels)
        depths.append(level_depths[0])
        layers.append(len(level_depths))
        if f"input_blocks.{n}.0.op.weight" not in shapes:
            break
        n += 1
    if not channels or len(set(layers)) != 1:
        raise LorakitError(f"U-Net: ResNets per level {layers}; expected the same number at every level")

    attention = [d > 0 for d in depths]
    if not any(attention):
        raise LorakitError("U-Net has no cross-attention transformers; not a text-conditioned U-Net")
    first = attention.index(True)
    prefix = f"input_blocks.{1 + first * (layers[0] + 1)}.1"
    cross_attention_dim = shapes[f"{prefix}.transformer_blocks.0.attn2.to_k.weight"][1]
    mid_depth = _count(shapes, "middle_block.1.transformer_blocks.{}.attn1.to_q.weight")
    if mid_depth == 0:
        raise LorakitError("U-Net: middle_block.1 has no transformer; not a text-conditioned U-Net")
    if attention[-1] and depths[-1] != mid_depth:
        raise LorakitError(f"U-Net: middle block depth {mid_depth} differs from the last level's {depths[-1]}")
    # Levels without attention keep the placeholder depth 1; diffusers takes the middle block's from the last.
    depths = [d if d else 1 for d in depths[:-1]] + [depths[-1] or mid_depth]
    return _LDMLayout(in_channels, out_channels, channels, depths, layers[0], attention, cross_attention_dim,
                      len(shapes[f"{prefix}.proj_in.weight"]) == 2)


def _checked(config: dict, shapes: Mapping[str, tuple[int, ...]], what: str) -> dict:
    """`config` with the time embedding's width, after checking it names exactly the checkpoint's modules."""
    channels = config["block_out_channels"]
    if shapes["time_embed.0.weight"][0] != 4 * channels[0]:
        config["time_embedding_dim"] = shapes["time_embed.0.weight"][0]
    expected = set(unet_module_paths(config).values())
    found = {key.rpartition(".")[0] for key in shapes}
    odd = sorted(found - expected) or sorted(expected - found)
    if odd:
        state = "unexpected" if found - expected else "missing"
        raise LorakitError(f"U-Net: {state} module {odd[0]!r} for the inferred {what} layout")
    return config
