"""The SDXL U-Net configs, SGM <-> diffusers name map and shape inference, checked against diffusers and sd-scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from lorakit.errors import LorakitError
from lorakit.models.prefixes import UNET_PREFIX
from lorakit.models.unet import (
    unet_config,
    unet_config_from_sgm,
    unet_module_paths,
    unet_to_diffusers,
    unet_to_sgm,
)

LORA_KEYS = Path(__file__).parent / "data" / "sdxl-lora-keys.json"
BLOCK = "transformer_blocks"


def _variant_config() -> dict:
    """A second layout (4 levels, 1 ResNet per level, attention only in the middle levels, like SDXL's refiner)."""
    config = unet_config("tiny")
    config.update(
        block_out_channels=[32, 64, 64, 128],
        layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 3, 1, 2],
        attention_head_dim=[1, 1, 1, 2],
    )
    return config


CONFIGS = {"tiny": lambda: unet_config("tiny"), "variant": _variant_config}


def _random_state(config: dict) -> dict[str, torch.Tensor]:
    """Every tensor filled with distinct random values, so a swapped key cannot go unnoticed."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config)
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _assert_bit_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_bit_exact(name):
    config = CONFIGS[name]()
    state = _random_state(config)
    sgm = unet_to_sgm(state, config)
    assert len(sgm) == len(state)
    _assert_bit_equal(unet_to_diffusers(sgm, config), state)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_single_file_converter_reads_our_sgm_layout(name):
    config = CONFIGS[name]()
    state = _random_state(config)
    sgm = unet_to_sgm(state, config)
    checkpoint = {UNET_PREFIX + k: v for k, v in sgm.items()}
    reference = convert_ldm_unet_checkpoint(checkpoint, config)
    _assert_bit_equal(reference, state)
    _assert_bit_equal(unet_to_diffusers(sgm, config), reference)


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_module_paths_cover_exactly_the_modules_holding_parameters(size):
    config = unet_config(size)
    model = _meta_unet(config)
    holding = {name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    paths = unet_module_paths(config)
    assert set(paths) == holding
    assert len(set(paths.values())) == len(paths)


@pytest.mark.parametrize(
    ("diffusers", "sgm"),
    [
        ("conv_in", "input_blocks.0.0"),
        ("down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", f"input_blocks.4.1.{BLOCK}.0.attn1.to_q"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", f"input_blocks.8.1.{BLOCK}.9.attn2.to_k"),
        ("mid_block.resnets.0.time_emb_proj", "middle_block.0.emb_layers.1"),
        ("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", f"middle_block.1.{BLOCK}.0.attn1.to_out.0"),
        ("mid_block.resnets.1.norm1", "middle_block.2.in_layers.0"),
        ("up_blocks.0.attentions.0.transformer_blocks.3.ff.net.0.proj", f"output_blocks.0.1.{BLOCK}.3.ff.net.0.proj"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2", f"output_blocks.5.1.{BLOCK}.1.ff.net.2"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ],
)
def test_sdxl_names_match_the_sgm_layout(diffusers, sgm):
    assert unet_module_paths(unet_config("full"))[diffusers] == sgm


def test_upsampler_sits_at_index_one_without_attention():
    paths = unet_module_paths(_variant_config())
    assert paths["up_blocks.0.upsamplers.0.conv"] == "output_blocks.1.1.conv"  # UpBlock2D
    assert paths["up_blocks.1.upsamplers.0.conv"] == "output_blocks.3.2.conv"  # CrossAttnUpBlock2D


def test_full_sdxl_parameter_count():
    assert sum(p.numel() for p in _meta_unet(unet_config("full")).parameters()) == 2_567_463_684


def _sgm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in unet_to_sgm(_meta_unet(config).state_dict(), config).items()}


@pytest.mark.parametrize("name", ["full", "tiny", "variant"])
def test_config_inferred_from_shapes(name):
    config = _variant_config() if name == "variant" else unet_config(name)
    inferred = unet_config_from_sgm(_sgm_shapes(config))
    fields = [k for k in config if k != "sample_size"]  # the latent size is not stored in a checkpoint
    assert {k: inferred[k] for k in fields} == {k: config[k] for k in fields}


def test_transformer_linears_match_sd_scripts_lora_names():
    config = unet_config("full")
    model = _meta_unet(config)
    paths = unet_module_paths(config)
    ours = set()
    for container, module in model.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for child, leaf in module.named_modules():
            if isinstance(leaf, torch.nn.Linear):
                ours.add(paths[f"{container}.{child}"].replace(".", "_"))
    tensors = json.loads(LORA_KEYS.read_text())["tensors"]
    suffix = ".lora_down.weight"
    theirs = {k[len("lora_unet_") : -len(suffix)] for k in tensors if k.startswith("lora_unet_") and k.endswith(suffix)}
    assert len(theirs) == 722
    assert ours == theirs


def test_sd15_shaped_unet_is_rejected():
    config = {
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        # Only so that our map can write it; SD 1.5 has no label_emb, which is dropped below.
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": 2816,
    }
    shapes = {k: s for k, s in _sgm_shapes(config).items() if not k.startswith("label_emb.")}
    with pytest.raises(LorakitError, match="768.*SD 1"):
        unet_config_from_sgm(shapes)


def test_non_unet_shapes_are_rejected():
    with pytest.raises(LorakitError, match="not an SGM"):
        unet_config_from_sgm({"encoder.conv_in.weight": (128, 3, 3, 3)})


def test_unexpected_key_is_reported():
    config = unet_config("tiny")
    sgm = unet_to_sgm(_random_state(config), config)
    sgm["input_blocks.1.7.weight"] = torch.zeros(1)
    with pytest.raises(LorakitError, match="input_blocks.1.7.weight"):
        unet_to_diffusers(sgm, config)
