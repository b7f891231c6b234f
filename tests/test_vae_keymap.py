"""The SDXL VAE configs, LDM <-> diffusers name map and shape inference, checked against diffusers' own converter."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from lorakit.errors import LorakitError
from lorakit.models.prefixes import VAE_PREFIX
from lorakit.models.vae import (
    LATENT_SCALE,
    vae_config,
    vae_config_from_sgm,
    vae_module_paths,
    vae_to_diffusers,
    vae_to_sgm,
)


def _variant_config() -> dict:
    """A second layout: 3 levels, 2 ResNets per level, channels changing at every level."""
    config = vae_config("tiny")
    config.update(
        block_out_channels=[32, 64, 96],
        layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
    )
    return config


CONFIGS = {"tiny": lambda: vae_config("tiny"), "variant": _variant_config}


def _random_state(config: dict) -> dict[str, torch.Tensor]:
    """Every tensor filled with distinct random values, so a swapped key cannot go unnoticed."""
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in AutoencoderKL(**config).state_dict().items()}


def _meta_vae(config: dict) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**config)


def _assert_bit_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_bit_exact(name):
    config = CONFIGS[name]()
    state = _random_state(config)
    sgm = vae_to_sgm(state, config)
    assert len(sgm) == len(state)
    _assert_bit_equal(vae_to_diffusers(sgm, config), state)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_single_file_converter_reads_our_ldm_layout(name):
    config = CONFIGS[name]()
    state = _random_state(config)
    sgm = vae_to_sgm(state, config)
    reference = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in sgm.items()}, config)
    _assert_bit_equal(reference, state)
    _assert_bit_equal(vae_to_diffusers(sgm, config), reference)


def test_ldm_layout_details():
    config = vae_config("full")
    paths = vae_module_paths(config)
    assert paths["decoder.up_blocks.0.resnets.2.conv2"] == "decoder.up.3.block.2.conv2"
    assert paths["decoder.up_blocks.0.upsamplers.0.conv"] == "decoder.up.3.upsample.conv"
    assert paths["decoder.up_blocks.3.resnets.0.conv_shortcut"] == "decoder.up.0.block.0.nin_shortcut"
    assert paths["encoder.down_blocks.1.resnets.0.conv_shortcut"] == "encoder.down.1.block.0.nin_shortcut"
    assert paths["encoder.mid_block.attentions.0.to_out.0"] == "encoder.mid.attn_1.proj_out"
    assert paths["encoder.conv_norm_out"] == "encoder.norm_out"
    shapes = {k: tuple(v.shape) for k, v in vae_to_sgm(_meta_vae(config).state_dict(), config).items()}
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert "encoder.down.3.downsample.conv.weight" not in shapes


def test_linear_attention_weights_in_ldm_files_are_accepted():
    config = vae_config("tiny")
    state = _random_state(config)
    sgm = vae_to_sgm(state, config)
    flat = {k: v.flatten(1) if ".attn_1." in k and v.ndim == 4 else v for k, v in sgm.items()}
    _assert_bit_equal(vae_to_diffusers(flat, config), state)


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_module_paths_cover_exactly_the_modules_holding_parameters(size):
    config = vae_config(size)
    model = _meta_vae(config)
    holding = {name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    paths = vae_module_paths(config)
    assert set(paths) == holding
    assert len(set(paths.values())) == len(paths)


def test_full_sdxl_vae():
    config = vae_config("full")
    assert sum(p.numel() for p in _meta_vae(config).parameters()) == 83_653_863
    assert config["scaling_factor"] == LATENT_SCALE == 0.13025
    assert config["block_out_channels"] == [128, 256, 512, 512]


@pytest.mark.parametrize("name", ["full", "tiny", "variant"])
def test_config_inferred_from_shapes(name):
    config = _variant_config() if name == "variant" else vae_config(name)
    shapes = {k: tuple(v.shape) for k, v in vae_to_sgm(_meta_vae(config).state_dict(), config).items()}
    inferred = vae_config_from_sgm(shapes)
    fields = [k for k in config if k != "sample_size"]  # the image size is not stored in a checkpoint
    assert {k: inferred[k] for k in fields} == {k: config[k] for k in fields}


def test_non_vae_shapes_are_rejected():
    with pytest.raises(LorakitError, match="not an LDM"):
        vae_config_from_sgm({"input_blocks.0.0.weight": (320, 4, 3, 3)})


def test_missing_module_is_reported():
    config = vae_config("tiny")
    state = _random_state(config)
    shapes = {k: tuple(v.shape) for k, v in vae_to_sgm(state, config).items() if not k.startswith("quant_conv.")}
    with pytest.raises(LorakitError, match="missing module 'quant_conv'"):
        vae_config_from_sgm(shapes)
