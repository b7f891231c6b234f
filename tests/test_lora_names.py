"""LoRA targets and names on the full SDXL architecture (meta device) against a real sd-scripts file's keys,
network_args parsing, block indices and parameter groups."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lorakit.errors import LorakitError
from lorakit.models.text_encoders import te1_config, te2_config
from lorakit.models.unet import unet_config
from lorakit.network.args import lr_weight_preset, parse_network_args
from lorakit.network.network import build_network
from lorakit.network.targets import block_index

REFERENCE = json.loads((Path(__file__).parent / "data" / "sdxl-lora-keys.json").read_text())


@pytest.fixture(scope="module")
def full_models():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("full"))
        te1 = CLIPTextModel(te1_config("full"))
        te2 = CLIPTextModelWithProjection(te2_config("full"))
    return unet, te1, te2


def shapes_of(network) -> dict[str, list[int]]:
    # Meta tensors cannot be saved: the would-be file is the network's state dict.
    return {key: list(value.shape) for key, value in network.state_dict().items()}


def test_full_sdxl_names_and_shapes_equal_the_reference_file(full_models):
    unet, te1, te2 = full_models
    network = build_network(unet, [te1, te2], network_dim=8, network_alpha=4)
    expected = {key: shape for key, (shape, _dtype) in REFERENCE["tensors"].items()}
    assert len(expected) == 2958
    assert shapes_of(network) == expected
    assert all(lora.scale == 0.5 and lora.alpha.dim() == 0 for lora in network.loras)
    assert {network.part_of(lora) for lora in network.loras} == {"unet", "te1", "te2"}
    assert len(network.loras_of("unet")) == 722
    assert len(network.loras_of("te1")) == 72
    assert len(network.loras_of("te2")) == 192


def test_unet_only_and_text_encoder_only_create_no_modules_for_the_other_part(full_models):
    unet, te1, te2 = full_models
    unet_only = build_network(unet, [te1, te2], network_dim=8, network_alpha=4, train_text_encoder=False)
    expected = {k: s for k, (s, _) in REFERENCE["tensors"].items() if k.startswith("lora_unet_")}
    assert len(expected) == 2166
    assert shapes_of(unet_only) == expected
    te_only = build_network(unet, [te1, te2], network_dim=8, network_alpha=4, train_unet=False)
    assert shapes_of(te_only) == {k: s for k, (s, _) in REFERENCE["tensors"].items() if k.startswith("lora_te")}


def test_conv_dim_adds_the_66_resnet_and_resampler_layers(full_models):
    unet, _, _ = full_models
    base = shapes_of(build_network(unet, [], network_dim=8, network_alpha=4))
    conv = shapes_of(build_network(unet, [], network_dim=8, network_alpha=4,
                                   network_args={"conv_dim": "4", "conv_alpha": "2"}))
    added = {key[: -len(".lora_down.weight")] for key in set(conv) - set(base) if key.endswith(".lora_down.weight")}
    assert len(added) == 66 and set(base) < set(conv)
    # Names of a real sd-scripts SDXL LoRA, with Linear / 1x1 at network_dim and 3x3 at conv_dim:
    assert conv["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"] == [4, 320, 3, 3]
    assert conv["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"] == [320, 4, 1, 1]
    assert conv["lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight"] == [8, 1280]
    assert conv["lora_unet_input_blocks_1_0_out_layers_3.lora_down.weight"] == [4, 320, 3, 3]
    assert conv["lora_unet_input_blocks_4_0_skip_connection.lora_down.weight"] == [8, 320, 1, 1]
    assert conv["lora_unet_input_blocks_3_0_op.lora_down.weight"] == [4, 320, 3, 3]
    assert conv["lora_unet_output_blocks_2_2_conv.lora_down.weight"] == [4, 1280, 3, 3]
    assert conv["lora_unet_output_blocks_5_2_conv.lora_down.weight"] == [4, 640, 3, 3]
    kinds = {name.rsplit("_", 2)[-2] + "_" + name.rsplit("_", 2)[-1] for name in added}
    assert kinds == {"layers_2", "layers_1", "layers_3", "skip_connection", "0_op", "2_conv"}


def test_zero_block_dims_drop_those_blocks(full_models):
    unet, _, _ = full_models
    dims = [8] * 23
    dims[5] = dims[8] = 0  # input_blocks 4 and 7 (the first transformer of each attention level)
    dims[14] = 16
    network = build_network(unet, [], network_dim=8, network_alpha=4,
                            network_args={"block_dims": ",".join(map(str, dims))})
    names = [lora.lora_name for lora in network.loras]
    assert not any(n.startswith(("lora_unet_input_blocks_4_", "lora_unet_input_blocks_7_")) for n in names)
    assert len(names) == 722 - (2 + 2 * 10) - (2 + 10 * 10)  # proj_in/out + 10 per transformer block
    assert all(lora.rank == (16 if lora.lora_name.startswith("lora_unet_output_blocks_1_") else 8)
               for lora in network.loras)


def test_zero_block_lr_weight_removes_the_block_and_groups_follow_blocks(full_models):
    unet, te1, _ = full_models
    network = build_network(unet, [te1], network_dim=4, network_alpha=1,
                            network_args={"down_lr_weight": "0,0,0,0,0,0,0,0,0", "up_lr_weight": "linear+0.5",
                                          "block_lr_zero_threshold": "0.1", "loraplus_unet_lr_ratio": "16"})
    assert not any("input_blocks" in lora.lora_name for lora in network.loras)
    groups = network.parameter_groups(unet_lr=1e-4, text_encoder1_lr=None, text_encoder2_lr=None, learning_rate=1e-3)
    names = [group["name"] for group in groups]
    assert names[0] == "textencoder1" and groups[0]["lr"] == 1e-3
    assert "unet_block11" in names and "unet_block11 plus" in names and "unet_block10" not in names
    assert names[1:] == sorted(names[1:], key=lambda n: int(n.split()[0][len("unet_block"):]))
    weights = lr_weight_preset("linear", 0.5)
    by_name = {group["name"]: group["lr"] for group in groups}
    assert by_name["unet_block13"] == pytest.approx(1e-4 * weights[0])
    assert by_name["unet_block18 plus"] == pytest.approx(1e-4 * weights[5] * 16)


def test_block_index_table():
    cases = {
        "lora_unet_input_blocks_0_0": 1,
        "lora_unet_input_blocks_1_0_in_layers_2": 2,
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k": 9,
        "lora_unet_middle_block_1_proj_in": 11,
        "lora_unet_output_blocks_0_1_proj_out": 13,
        "lora_unet_output_blocks_8_0_skip_connection": 21,
        "lora_unet_time_embed_0": 0,
        "lora_unet_out_2": 22,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": -1,
    }
    assert {name: block_index(name) for name in cases} == cases


def test_lr_weight_presets_match_sd_scripts_formulas():
    assert lr_weight_preset("linear", 0.0) == tuple(i / 8 for i in range(9))
    assert lr_weight_preset("reverse_linear", 0.0)[0] == 1.0
    assert lr_weight_preset("cosine", 0.0)[0] == pytest.approx(1.0) and lr_weight_preset("cosine", 0.0)[-1] == 0.0
    assert lr_weight_preset("sine", 0.0)[4] == pytest.approx(math.sin(math.pi / 4))
    assert lr_weight_preset("zeros", 0.25) == (0.25,) * 9


def test_network_args_parse_and_defaults():
    args = parse_network_args({"conv_dim": "8", "rank_dropout": "0.1", "mid_lr_weight": "1,,0.5",
                               "loraplus_lr_ratio": "4", "loraplus_text_encoder_lr_ratio": "2"})
    assert args.conv_dim == 8 and args.conv_alpha is None and args.rank_dropout == 0.1
    assert args.mid_lr_weight == (1.0, 0.0, 0.5)
    assert args.block_lr_weights == (1.0,) * 10 + (1.0, 0.0, 0.5) + (1.0,) * 10
    assert args.loraplus_ratio("unet") == 4 and args.loraplus_ratio("te1") == 2


@pytest.mark.parametrize("values, message", [
    ({"conv_rank": "4"}, "unknown key 'conv_rank'"),
    ({"dropout": "0.1"}, "--network_dropout"),
    ({"block_dims": "1,2,3"}, "block_dims: expected 23 comma-separated values"),
    ({"conv_block_alphas": ",".join(["1"] * 24)}, "got 24"),
    ({"down_lr_weight": "1,1"}, "down_lr_weight: expected 9"),
    ({"up_lr_weight": "square"}, "preset"),
    ({"conv_dim": "four"}, "conv_dim='four': expected an integer"),
    ({"module_dropout": "1.5"}, "module_dropout=1.5"),
])
def test_bad_network_args_name_the_key(values, message):
    with pytest.raises(LorakitError, match=message.replace("(", r"\(")):
        parse_network_args(values)


def test_zero_learning_rate_freezes_that_part():
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)
    te, te2 = CLIPTextModel(config), CLIPTextModel(config)
    network = build_network(None, [te, te2], network_dim=2, network_args={"loraplus_lr_ratio": "8"})
    groups = network.parameter_groups(unet_lr=None, text_encoder1_lr=0.0, text_encoder2_lr=2e-5, learning_rate=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder2", 2e-5), ("textencoder2 plus", 1.6e-4)]
    assert all(not p.requires_grad for lora in network.loras_of("te1") for p in lora.parameters())
    assert all(p.requires_grad for lora in network.loras_of("te2") for p in lora.parameters())
