"""SDXL text encoders: configs, shape inference and the SGM <-> transformers maps, checked against diffusers'
single-file converters as the independent reference."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lorakit.errors import LorakitError
from lorakit.models.prefixes import TE1_PREFIX, TE2_PREFIX
from lorakit.models.text_encoders import (
    te1_config,
    te1_config_from_sgm,
    te1_to_diffusers,
    te1_to_sgm,
    te2_config,
    te2_config_from_sgm,
    te2_to_diffusers,
    te2_to_sgm,
)


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def te1() -> CLIPTextModel:
    model = CLIPTextModel(te1_config("tiny"))
    model.load_state_dict(_random_state(model, 1))
    return model


@pytest.fixture(scope="module")
def te2() -> CLIPTextModelWithProjection:
    model = CLIPTextModelWithProjection(te2_config("tiny"))
    model.load_state_dict(_random_state(model, 2))
    return model


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_full_size_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        te1_full = CLIPTextModel(te1_config("full"))
        te2_full = CLIPTextModelWithProjection(te2_config("full"))
    assert sum(p.numel() for p in te1_full.parameters()) == 123_060_480
    assert sum(p.numel() for p in te2_full.parameters()) == 694_659_840
    assert te1_full.config.num_attention_heads == 12 and te1_full.config.hidden_act == "quick_gelu"
    assert te2_full.config.num_attention_heads == 20 and te2_full.config.hidden_act == "gelu"
    assert te2_full.config.projection_dim == 1280 and te2_full.config.num_hidden_layers == 32


def test_full_size_sgm_shapes_infer_the_full_configs() -> None:
    with torch.device("meta"):
        te1_full = CLIPTextModel(te1_config("full"))
        te2_full = CLIPTextModelWithProjection(te2_config("full"))
    sgm1 = te1_to_sgm(te1_full.state_dict(), te1_full.config)
    sgm2 = te2_to_sgm(te2_full.state_dict(), te2_full.config)
    # The real SDXL base checkpoint's OpenCLIP layout, spot-checked.
    assert _shapes(sgm2)["transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert _shapes(sgm2)["text_projection"] == (1280, 1280)
    assert _shapes(sgm2)["positional_embedding"] == (77, 1280)
    assert len(sgm1) == 196 and len(sgm2) == 389
    assert te1_config_from_sgm(_shapes(sgm1)).to_dict() == te1_config("full").to_dict()
    assert te2_config_from_sgm(_shapes(sgm2)).to_dict() == te2_config("full").to_dict()


def test_te1_round_trip_is_bit_exact(te1: CLIPTextModel) -> None:
    state = te1.state_dict()
    sgm = te1_to_sgm(state, te1.config)
    assert all(key.startswith("text_model.") for key in sgm)
    config = te1_config_from_sgm(_shapes(sgm))
    _assert_bit_equal(te1_to_diffusers(sgm, config), dict(state))


def test_te2_round_trip_is_bit_exact(te2: CLIPTextModelWithProjection) -> None:
    state = te2.state_dict()
    sgm = te2_to_sgm(state, te2.config)
    config = te2_config_from_sgm(_shapes(sgm))
    _assert_bit_equal(te2_to_diffusers(sgm, config), dict(state))
    _assert_bit_equal(te2_to_sgm(te2_to_diffusers(sgm, config), config), sgm)


def test_te2_logit_scale_is_dropped_on_load_and_written_back_when_given(te2: CLIPTextModelWithProjection) -> None:
    logit_scale = torch.tensor(4.6052)
    sgm = te2_to_sgm(te2.state_dict(), te2.config, logit_scale=logit_scale)
    assert torch.equal(sgm["logit_scale"], logit_scale)
    state = te2_to_diffusers(sgm, te2.config)
    assert "logit_scale" not in state
    assert "logit_scale" not in te2_to_sgm(state, te2.config)


def test_te1_matches_diffusers_single_file_converter(te1: CLIPTextModel) -> None:
    sgm = te1_to_sgm(te1.state_dict(), te1.config)
    checkpoint = {TE1_PREFIX + key: value for key, value in sgm.items()}
    reference = convert_ldm_clip_checkpoint(checkpoint)
    reference = {key.removeprefix("text_model."): value for key, value in reference.items()}
    ours = te1_to_diffusers(sgm, te1_config_from_sgm(_shapes(sgm)))
    ours = {key.removeprefix("text_model."): value for key, value in ours.items()}
    _assert_bit_equal(ours, reference)


def test_te2_matches_diffusers_single_file_converter(te2: CLIPTextModelWithProjection) -> None:
    # An OpenCLIP-layout checkpoint built independently of te2_to_sgm: fuse q/k/v and transpose the projection.
    state = te2.state_dict()
    sgm = {}
    for i in range(te2.config.num_hidden_layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            sgm[f"{oc}attn.in_proj_{p}"] = torch.cat([state[f"{hf}self_attn.{x}_proj.{p}"] for x in "qkv"])
            sgm[f"{oc}attn.out_proj.{p}"] = state[f"{hf}self_attn.out_proj.{p}"]
            sgm[f"{oc}ln_1.{p}"] = state[f"{hf}layer_norm1.{p}"]
            sgm[f"{oc}ln_2.{p}"] = state[f"{hf}layer_norm2.{p}"]
            sgm[f"{oc}mlp.c_fc.{p}"] = state[f"{hf}mlp.fc1.{p}"]
            sgm[f"{oc}mlp.c_proj.{p}"] = state[f"{hf}mlp.fc2.{p}"]
    for p in ("weight", "bias"):
        sgm[f"ln_final.{p}"] = state[f"text_model.final_layer_norm.{p}"]
    sgm["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    sgm["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    sgm["text_projection"] = state["text_projection.weight"].T.contiguous()
    sgm["logit_scale"] = torch.tensor(4.6052)

    checkpoint = {TE2_PREFIX + key: value for key, value in sgm.items()}
    reference = convert_open_clip_checkpoint(te2, checkpoint, prefix=TE2_PREFIX)
    config = te2_config_from_sgm(_shapes(sgm))
    _assert_bit_equal(te2_to_diffusers(sgm, config), reference)
    _assert_bit_equal(reference, dict(state))
    _assert_bit_equal(te2_to_sgm(state, config, logit_scale=sgm["logit_scale"]), sgm)


def test_te2_linear_layout_projection_is_copied_as_is(te2: CLIPTextModelWithProjection) -> None:
    sgm = te2_to_sgm(te2.state_dict(), te2.config)
    sgm["text_projection.weight"] = sgm.pop("text_projection").T.contiguous()
    state = te2_to_diffusers(sgm, te2_config_from_sgm(_shapes(sgm)))
    assert torch.equal(state["text_projection.weight"], te2.state_dict()["text_projection.weight"])


def test_te1_position_ids_are_ignored(te1: CLIPTextModel) -> None:
    sgm = te1_to_sgm(te1.state_dict(), te1.config)
    sgm["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert "embeddings.position_ids" not in te1_to_diffusers(sgm, te1.config)


def test_te1_to_sgm_accepts_the_wrapped_state_dict_layout(te1: CLIPTextModel) -> None:
    state = te1.state_dict()
    wrapped = {("text_model." + key).replace("text_model.text_model.", "text_model."): v for key, v in state.items()}
    _assert_bit_equal(te1_to_sgm(wrapped, te1.config), te1_to_sgm(state, te1.config))


def test_bad_checkpoints_give_one_line_errors(te1: CLIPTextModel, te2: CLIPTextModelWithProjection) -> None:
    sgm1 = te1_to_sgm(te1.state_dict(), te1.config)
    sgm2 = te2_to_sgm(te2.state_dict(), te2.config)

    with pytest.raises(LorakitError, match=r"conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.token"):
        te1_config_from_sgm({k: v for k, v in _shapes(sgm1).items() if "token_embedding" not in k})
    with pytest.raises(LorakitError, match="text_projection"):
        te2_config_from_sgm({k: v for k, v in _shapes(sgm2).items() if k != "text_projection"})
    with pytest.raises(LorakitError, match="layers 0..N-1"):
        te2_config_from_sgm({k: v for k, v in _shapes(sgm2).items() if ".resblocks.1." not in k})

    missing = {k: v for k, v in sgm2.items() if k != "ln_final.bias"}
    with pytest.raises(LorakitError, match=r"missing, e\.g\. conditioner\.embedders\.1\.model\.ln_final\.bias"):
        te2_to_diffusers(missing, te2.config)
    with pytest.raises(LorakitError, match=r"unexpected key.*\.resblocks\.3\."):
        te2_to_diffusers({**sgm2, "transformer.resblocks.3.ln_1.weight": torch.zeros(64)}, te2.config)
    with pytest.raises(LorakitError) as raised:
        te1_to_diffusers({**sgm1, "text_model.extra": torch.zeros(1)}, te1.config)
    assert "\n" not in str(raised.value)
