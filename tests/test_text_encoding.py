"""SDXL text encoding (75-token chunks, penultimate states, pooled TE2 output) and the added size conditioning.

Independent references: OpenCLIP's text-tower math written here from the OpenCLIP-layout tensors, and
diffusers' own timestep embedding / `UNet2DConditionModel` SDXL conditioning."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lorakit.errors import LorakitError
from lorakit.models.conditioning import added_condition, size_condition
from lorakit.models.text_encoders import te1_config_from_sgm, te1_to_diffusers, te2_config_from_sgm, te2_to_diffusers
from lorakit.models.text_encoding import encode_tokens, sequence_length, split_chunks, tokenize
from lorakit.models.tokenizers import load_tokenizers

BOS, EOS = 49406, 49407
WIDTH, LAYERS, MLP, VOCAB, POSITIONS = 64, 3, 256, 49408, 77


def _openclip_layout(seed: int, projection: bool) -> dict[str, torch.Tensor]:
    """Random tensors of a tiny text tower in OpenCLIP layout (fused attention, `x @ text_projection`)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    sgm = {"token_embedding.weight": randn(VOCAB, WIDTH, scale=1.0), "positional_embedding": randn(POSITIONS, WIDTH)}
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        for norm in ("ln_1", "ln_2"):
            sgm[f"{p}{norm}.weight"], sgm[f"{p}{norm}.bias"] = 1 + randn(WIDTH), randn(WIDTH)
        sgm[f"{p}attn.in_proj_weight"], sgm[f"{p}attn.in_proj_bias"] = randn(3 * WIDTH, WIDTH), randn(3 * WIDTH)
        sgm[f"{p}attn.out_proj.weight"], sgm[f"{p}attn.out_proj.bias"] = randn(WIDTH, WIDTH), randn(WIDTH)
        sgm[f"{p}mlp.c_fc.weight"], sgm[f"{p}mlp.c_fc.bias"] = randn(MLP, WIDTH), randn(MLP)
        sgm[f"{p}mlp.c_proj.weight"], sgm[f"{p}mlp.c_proj.bias"] = randn(WIDTH, MLP), randn(WIDTH)
    sgm["ln_final.weight"], sgm["ln_final.bias"] = 1 + randn(WIDTH), randn(WIDTH)
    if projection:
        sgm["text_projection"] = randn(WIDTH, WIDTH, scale=1.0)
    return sgm


def _openclip_forward(
    sgm: dict[str, torch.Tensor], tokens: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """OpenCLIP's TextTransformer: every residual stream state, and the ln_final state at tokens.argmax()."""
    x = F.embedding(tokens, sgm["token_embedding.weight"]) + sgm["positional_embedding"]
    mask = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)
    states = [x]
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (WIDTH,), sgm[f"{p}ln_1.weight"], sgm[f"{p}ln_1.bias"]).transpose(0, 1)
        attention, _ = F.multi_head_attention_forward(
            h, h, h, WIDTH, 1, sgm[f"{p}attn.in_proj_weight"], sgm[f"{p}attn.in_proj_bias"], None, None, False, 0.0,
            sgm[f"{p}attn.out_proj.weight"], sgm[f"{p}attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask,
        )
        x = x + attention.transpose(0, 1)
        h = F.layer_norm(x, (WIDTH,), sgm[f"{p}ln_2.weight"], sgm[f"{p}ln_2.bias"])
        h = act(F.linear(h, sgm[f"{p}mlp.c_fc.weight"], sgm[f"{p}mlp.c_fc.bias"]))
        x = x + F.linear(h, sgm[f"{p}mlp.c_proj.weight"], sgm[f"{p}mlp.c_proj.bias"])
        states.append(x)
    final = F.layer_norm(x, (WIDTH,), sgm["ln_final.weight"], sgm["ln_final.bias"])
    return states, final[torch.arange(tokens.shape[0]), tokens.argmax(dim=-1)]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _te1_sgm_from_openclip(sgm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights spelled as CLIP-L's SGM keys (transformers names): split q/k/v, rename."""
    te1 = {
        "text_model.embeddings.token_embedding.weight": sgm["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sgm["positional_embedding"],
        "text_model.final_layer_norm.weight": sgm["ln_final.weight"],
        "text_model.final_layer_norm.bias": sgm["ln_final.bias"],
    }
    for i in range(LAYERS):
        p, q = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for param in ("weight", "bias"):
            for name, part in zip("qkv", sgm[f"{p}attn.in_proj_{param}"].chunk(3)):
                te1[f"{q}self_attn.{name}_proj.{param}"] = part
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                te1[f"{q}{ours}.{param}"] = sgm[f"{p}{theirs}.{param}"]
    return te1


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.fixture(scope="module")
def encoders() -> dict:
    sgm1, sgm2 = _openclip_layout(1, projection=False), _openclip_layout(2, projection=True)
    te1_sgm = _te1_sgm_from_openclip(sgm1)
    config1, config2 = te1_config_from_sgm(_shapes(te1_sgm)), te2_config_from_sgm(_shapes(sgm2))
    te1, te2 = CLIPTextModel(config1).eval(), CLIPTextModelWithProjection(config2).eval()
    te1.load_state_dict(te1_to_diffusers(te1_sgm, config1), strict=True)
    te2.load_state_dict(te2_to_diffusers(sgm2, config2), strict=True)
    return {"te1": te1, "te2": te2, "sgm1": sgm1, "sgm2": sgm2}


# --- tokenisation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_token_length", "length"), [(None, 77), (75, 77), (150, 152), (225, 227)])
def test_sequence_length(max_token_length: int | None, length: int) -> None:
    assert sequence_length(max_token_length) == length


def test_unsupported_max_token_length_is_a_clear_error() -> None:
    with pytest.raises(LorakitError, match="--max_token_length is 100; expected 75, 150 or 225"):
        sequence_length(100)


@pytest.mark.parametrize(("max_token_length", "chunks"), [(None, 1), (75, 1), (150, 2), (225, 3)])
def test_tokenize_shapes(max_token_length: int | None, chunks: int) -> None:
    for tokenizer in load_tokenizers():
        tokens = tokenize(tokenizer, ["a photo of a cat", "a dog"], max_token_length)
        assert tokens.shape == (2, chunks, 77) and tokens.dtype == torch.long
        assert tokens[0, 0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]


def test_chunk_layout_on_a_hand_built_sequence() -> None:
    content = list(range(1000, 1080))  # 80 content ids: 75 fill chunk 0, 5 go to chunk 1
    eos_padded = torch.tensor([[BOS, *content, EOS, *[EOS] * 70]])
    zero_padded = torch.tensor([[BOS, *content, EOS, *[0] * 70]])
    short = torch.tensor([[BOS, 1000, EOS, *[0] * 149]])

    te1 = split_chunks(eos_padded, EOS, EOS)
    assert te1.shape == (1, 2, 77)
    assert te1[0, 0].tolist() == [BOS, *content[:75], EOS]
    assert te1[0, 1].tolist() == [BOS, *content[75:], EOS, *[EOS] * 70]

    te2 = split_chunks(zero_padded, EOS, 0)
    # Chunk 0 ends in content, so its closing id (the sequence's last id, padding) becomes EOS.
    assert te2[0, 0].tolist() == [BOS, *content[:75], EOS]
    assert te2[0, 1].tolist() == [BOS, *content[75:], EOS, *[0] * 70]

    # A chunk holding only padding becomes BOS, EOS, PAD...
    empty = split_chunks(short, EOS, 0)
    assert empty[0, 0].tolist() == [BOS, 1000, EOS, *[0] * 74]
    assert empty[0, 1].tolist() == [BOS, EOS, *[0] * 75]


def test_tokenize_chunks_and_truncates_long_captions() -> None:
    tokenizer1, tokenizer2 = load_tokenizers()
    caption = " ".join(["cat"] * 100)
    tokens2 = tokenize(tokenizer2, [caption], 150)
    assert tokens2[0, 0].tolist() == [BOS, *[2368] * 75, EOS]
    assert tokens2[0, 1].tolist() == [BOS, *[2368] * 25, EOS, *[0] * 50]
    tokens1 = tokenize(tokenizer1, [caption], 150)
    assert tokens1[0, 1].tolist() == [BOS, *[2368] * 25, *[EOS] * 51]
    # 300 words do not fit in 225 tokens: the end is cut and every chunk is full.
    for tokenizer in (tokenizer1, tokenizer2):
        tokens = tokenize(tokenizer, [" ".join(["cat"] * 300)], 225)
        assert tokens[0].tolist() == [[BOS, *[2368] * 75, EOS]] * 3


# --- encoding -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_encoding_matches_openclip_math(encoders: dict) -> None:
    tokenizer1, tokenizer2 = load_tokenizers()
    captions = ["a photo of a cat", "a dog on a red sofa, oil painting"]
    tokens1, tokens2 = tokenize(tokenizer1, captions, None), tokenize(tokenizer2, captions, None)
    context, pooled = encode_tokens(encoders["te1"], encoders["te2"], tokens1, tokens2)
    assert context.shape == (2, 77, 128) and pooled.shape == (2, 64)

    states1, _ = _openclip_forward(encoders["sgm1"], tokens1[:, 0], _quick_gelu)
    states2, final2 = _openclip_forward(encoders["sgm2"], tokens2[:, 0], F.gelu)
    # Penultimate layer outputs (layer 2 of 3), without the final layer norm.
    torch.testing.assert_close(context[..., :64], states1[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(context[..., 64:], states2[-2], rtol=1e-5, atol=1e-5)
    reference_pooled = final2 @ encoders["sgm2"]["text_projection"]
    torch.testing.assert_close(pooled, reference_pooled, rtol=1e-5, atol=1e-5)
    # sd-scripts' untransposed copy of text_projection gives another vector (the check above would catch it).
    assert not torch.allclose(final2 @ encoders["sgm2"]["text_projection"].T, reference_pooled, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize(("max_token_length", "length"), [(None, 77), (150, 152), (225, 227)])
def test_encoded_sequence_lengths_and_chunk_reassembly(
    encoders: dict, max_token_length: int | None, length: int
) -> None:
    tokenizer1, tokenizer2 = load_tokenizers()
    captions = [" ".join(["cat", "dog", "sofa"] * 60), "a photo of a cat"]
    tokens1 = tokenize(tokenizer1, captions, max_token_length)
    tokens2 = tokenize(tokenizer2, captions, max_token_length)
    context, pooled = encode_tokens(encoders["te1"], encoders["te2"], tokens1, tokens2)
    assert context.shape == (2, length, 128) and pooled.shape == (2, 64)

    chunks = tokens2.shape[1]
    states2, final2 = _openclip_forward(encoders["sgm2"], tokens2.reshape(-1, 77), F.gelu)
    per_chunk = states2[-2].reshape(2, chunks, 77, 64)
    middles = [per_chunk[:, c, 1:76] for c in range(chunks)]
    expected = torch.cat([per_chunk[:, 0, :1], *middles, per_chunk[:, -1, -1:]], dim=1)
    torch.testing.assert_close(context[..., 64:], expected, rtol=1e-5, atol=1e-5)
    # Pooled comes from the first chunk of each caption.
    first_chunk_pooled = (final2 @ encoders["sgm2"]["text_projection"]).reshape(2, chunks, 64)[:, 0]
    torch.testing.assert_close(pooled, first_chunk_pooled, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_token_weights_scale_hidden_states_but_not_pooled(encoders: dict) -> None:
    tokenizer1, tokenizer2 = load_tokenizers()
    tokens1, tokens2 = tokenize(tokenizer1, ["a photo of a cat"], 150), tokenize(tokenizer2, ["a photo of a cat"], 150)
    weights = torch.ones(1, 2, 77)
    weights[0, 0, 5] = 1.5  # "cat"
    weights[0, 1, 3] = 0.5  # a padding position of chunk 1 -> sequence position 75 + 3
    plain, plain_pooled = encode_tokens(encoders["te1"], encoders["te2"], tokens1, tokens2)
    weighted, weighted_pooled = encode_tokens(encoders["te1"], encoders["te2"], tokens1, tokens2, weights, weights)
    scale = torch.ones(152)
    scale[5], scale[78] = 1.5, 0.5
    torch.testing.assert_close(weighted, plain * scale[None, :, None], rtol=0, atol=0)
    torch.testing.assert_close(weighted_pooled, plain_pooled, rtol=0, atol=0)


# --- size conditioning --------------------------------------------------------------------------------------------


def test_size_condition_matches_diffusers_timestep_embedding() -> None:
    original, crop, target = [(1024, 768), (600, 1400)], [(0, 128), (32, 0)], [(1024, 1024), (832, 1216)]
    ours = size_condition(original, crop, target)
    values = torch.tensor([[*o, *c, *t] for o, c, t in zip(original, crop, target)], dtype=torch.float32)
    reference = get_timestep_embedding(values.flatten(), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert ours.shape == (2, 1536)
    torch.testing.assert_close(ours, reference.reshape(2, 1536), rtol=0, atol=0)
    # Hand values: the first frequency is 1, so embedding 0 of original h is [cos(h), ..., sin(h), ...].
    assert ours[0, 0].item() == pytest.approx(torch.cos(torch.tensor(1024.0)).item())
    assert ours[0, 128].item() == pytest.approx(torch.sin(torch.tensor(1024.0)).item())
    crop_top = ours[0, 512:768]
    assert crop_top[:128].tolist() == [1.0] * 128 and crop_top[128:].tolist() == [0.0] * 128


def test_added_condition_is_what_the_diffusers_sdxl_unet_builds() -> None:
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
        layers_per_block=1, cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=64 + 6 * 256,
    )
    pooled = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    original, crop, target = [(1024, 768), (600, 1400)], [(0, 128), (32, 0)], [(1024, 1024), (832, 1216)]
    time_ids = torch.tensor([[*o, *c, *t] for o, c, t in zip(original, crop, target)], dtype=torch.float32)
    emb = torch.zeros(2, unet.time_embedding.linear_2.out_features)
    with torch.no_grad():
        reference = unet.get_aug_embed(emb, None, {"text_embeds": pooled, "time_ids": time_ids})
        ours = added_condition(pooled, original, crop, target)
        assert ours.shape == (2, 64 + 1536)
        torch.testing.assert_close(unet.add_embedding(ours), reference, rtol=0, atol=0)


def test_added_condition_is_2816_wide_for_sdxl_and_accepts_one_pair() -> None:
    vector = added_condition(torch.zeros(1, 1280), (1024, 1024), (0, 0), (1024, 1024))
    assert vector.shape == (1, 2816)
