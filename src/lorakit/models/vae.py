"""The SDXL VAE: diffusers `AutoencoderKL` configs, shape inference and the LDM <-> diffusers name map.

Single-file checkpoints keep the VAE in the original LDM layout (`encoder.down.N.block.M`, decoder `up` levels
numbered from the bottom, mid-block attention as 1x1 convolutions); lorakit runs diffusers' `AutoencoderKL`.
The map is derived from the config, so it holds for any number of levels and ResNets per level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor

from lorakit.errors import LorakitError

LATENT_SCALE = 0.13025  # SDXL's VAE scaling factor (SD 1.x used 0.18215)

# diffusers ResnetBlock2D leaf -> LDM ResnetBlock leaf
_RESNET_LEAVES = {name: name for name in ("norm1", "conv1", "norm2", "conv2")} | {"conv_shortcut": "nin_shortcut"}
_ATTENTION_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Linear in diffusers, 1x1 convolution in LDM.
_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")


def _autoencoder_config(channels: list[int], layers_per_block: int, *, sample_size: int, **shape: int) -> dict:
    return {
        "in_channels": shape.get("in_channels", 3),
        "out_channels": shape.get("out_channels", 3),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": layers_per_block,
        "latent_channels": shape.get("latent_channels", 4),
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": LATENT_SCALE,
    }


def vae_config(size: Literal["tiny", "full"]) -> dict:
    """Keyword arguments for diffusers `AutoencoderKL(**config)`: the real SDXL VAE, or a tiny one (same factor 8)."""
    if size == "full":
        return _autoencoder_config([128, 256, 512, 512], 2, sample_size=1024)
    if size == "tiny":
        return _autoencoder_config([32, 32, 64, 64], 1, sample_size=256)
    raise LorakitError(f"unknown model size {size!r}; expected 'tiny' or 'full'")


def _resnet(paths: dict[str, str], diffusers: str, ldm: str, *, shortcut: bool) -> None:
    for d_leaf, l_leaf in _RESNET_LEAVES.items():
        if d_leaf != "conv_shortcut" or shortcut:
            paths[f"{diffusers}.{d_leaf}"] = f"{ldm}.{l_leaf}"


def _mid_block(paths: dict[str, str], half: str) -> None:
    _resnet(paths, f"{half}.mid_block.resnets.0", f"{half}.mid.block_1", shortcut=False)
    for d_leaf, l_leaf in _ATTENTION_LEAVES.items():
        paths[f"{half}.mid_block.attentions.0.{d_leaf}"] = f"{half}.mid.attn_1.{l_leaf}"
    _resnet(paths, f"{half}.mid_block.resnets.1", f"{half}.mid.block_2", shortcut=False)


def vae_module_paths(config: Mapping) -> dict[str, str]:
    """diffusers module path -> LDM module path, for every module of the VAE that directly holds parameters."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    levels = len(channels)
    paths = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for half in ("encoder", "decoder"):
        for leaf, ldm in (("conv_in", "conv_in"), ("conv_norm_out", "norm_out"), ("conv_out", "conv_out")):
            paths[f"{half}.{leaf}"] = f"{half}.{ldm}"
        _mid_block(paths, half)

    previous = channels[0]
    for i in range(levels):
        for j in range(layers):
            shortcut = j == 0 and previous != channels[i]
            _resnet(paths, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", shortcut=shortcut)
        previous = channels[i]
        if i < levels - 1:
            paths[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"

    # The decoder's diffusers up_blocks run top-down from the latent; LDM numbers its `up` levels bottom-up.
    previous = channels[-1]
    for u in range(levels):
        k = levels - 1 - u
        for j in range(layers + 1):
            shortcut = j == 0 and previous != channels[k]
            _resnet(paths, f"decoder.up_blocks.{u}.resnets.{j}", f"decoder.up.{k}.block.{j}", shortcut=shortcut)
        previous = channels[k]
        if k > 0:
            paths[f"decoder.up_blocks.{u}.upsamplers.0.conv"] = f"decoder.up.{k}.upsample.conv"
    return paths


def _is_attention_projection(ldm_module: str) -> bool:
    return ".mid.attn_1." in ldm_module and ldm_module.rpartition(".")[2] in _ATTENTION_PROJECTIONS


def _rename(
    state: Mapping[str, Tensor], module_map: Mapping[str, str], what: str, *, to_ldm: bool
) -> dict[str, Tensor]:
    """Rename every key through `module_map`, reading each tensor once and reshaping the attention projections."""
    renamed: dict[str, Tensor] = {}
    seen: set[str] = set()
    for key in state.keys():
        module, _, param = key.rpartition(".")
        target = module_map.get(module)
        if target is None:
            raise LorakitError(f"{what}: unexpected key {key!r}; it does not fit the VAE shape of this checkpoint")
        seen.add(module)
        tensor = state[key]
        ldm_module = target if to_ldm else module
        if param == "weight" and _is_attention_projection(ldm_module):
            # Some LDM files already store these as [C, C]; both forms are accepted.
            tensor = tensor.reshape(*tensor.shape[:2], 1, 1) if to_ldm else tensor.reshape(tensor.shape[:2])
        renamed[f"{target}.{param}"] = tensor
    missing = [m for m in module_map if m not in seen]
    if missing:
        raise LorakitError(f"{what}: no weights for module {missing[0]!r} ({len(missing)} modules missing)")
    return renamed


def vae_to_sgm(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL.state_dict()` keys -> LDM keys (without `VAE_PREFIX`)."""
    return _rename(state, vae_module_paths(config), "diffusers VAE", to_ldm=True)


def vae_to_diffusers(sgm: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """LDM VAE keys (without `VAE_PREFIX`) -> diffusers `AutoencoderKL` state-dict keys."""
    to_diffusers = {ldm: d for d, ldm in vae_module_paths(config).items()}
    return _rename(sgm, to_diffusers, "LDM VAE", to_ldm=False)


def _count(shapes: Mapping[str, tuple[int, ...]], template: str) -> int:
    k = 0
    while template.format(k) in shapes:
        k += 1
    return k


def vae_config_from_sgm(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Infer the diffusers config of an LDM VAE (keys without `VAE_PREFIX`) from its tensor shapes alone."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
        if key not in shapes:
            raise LorakitError(f"VAE: no {key}; this is not an LDM/SGM autoencoder")
    levels = _count(shapes, "encoder.down.{}.block.0.conv1.weight")
    layers = _count(shapes, "encoder.down.0.block.{}.conv1.weight")
    if levels == 0 or layers == 0:
        raise LorakitError("VAE: no encoder.down.0.block.0 ResNet; this is not an LDM/SGM autoencoder")
    channels = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    config = _autoencoder_config(
        channels,
        layers,
        sample_size=1024,
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["decoder.conv_in.weight"][1],
    )
    expected = set(vae_module_paths(config).values())
    found = {key.rpartition(".")[0] for key in shapes}
    odd = sorted(found - expected) or sorted(expected - found)
    if odd:
        state = "unexpected" if found - expected else "missing"
        raise LorakitError(f"VAE: {state} module {odd[0]!r} for the inferred LDM layout")
    return config
