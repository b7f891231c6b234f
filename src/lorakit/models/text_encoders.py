"""CLIP text encoders: transformers configs and the SGM/LDM (single-file) <-> transformers weight maps of SDXL's
two (below) and SD 2.x's OpenCLIP ViT-H (the `sd2_te_*` functions; SD 1.x's CLIP ViT-L is SDXL's TE1).

TE1 is CLIP ViT-L/14, stored in SGM checkpoints under `conditioner.embedders.0.transformer.` with the
transformers names (`text_model.embeddings...`). TE2 is OpenCLIP ViT-bigG/14, stored under
`conditioner.embedders.1.model.` in OpenCLIP's own layout (fused `attn.in_proj_*`, `text_projection` used as
`x @ text_projection`) and run here as a transformers `CLIPTextModelWithProjection`.

"sgm" state dicts are keyed without the component prefix. Converters read every key of the (possibly lazy)
mapping exactly once and return plain dicts; split q/k/v tensors are views of the fused OpenCLIP tensor.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel

from lorakit.errors import LorakitError
from lorakit.models.prefixes import SD2_TE_PREFIX, TE1_PREFIX, TE2_PREFIX

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
TE2_PAD_TOKEN_ID = 0  # OpenCLIP pads with "!" (id 0), CLIP-L (TE1) with the EOS token

_HEAD_DIM = 64
_TEXT_MODEL = "text_model."
_LAYER_NORMS = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"))
_MLP = (("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
_PARAMS = ("weight", "bias")
# Present in some checkpoints, no parameter in transformers: CLIP-L's position index buffer, and OpenCLIP's
# contrastive temperature (only used for CLIP's image-text loss; see te2_to_sgm for writing it back).
_TE1_IGNORED = {"text_model.embeddings.position_ids"}
_TE2_IGNORED = {"logit_scale"}
# Playground v2 stores the projection as `text_projection.weight` in nn.Linear layout [proj, width].
_TE2_LINEAR_PROJECTION = "text_projection.weight"


def _clip_text_config(
    *, width: int, layers: int, mlp: int, act: str, vocab: int, positions: int, pad_token_id: int,
    projection_dim: int | None = None,
) -> CLIPTextConfig:
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // _HEAD_DIM),
        max_position_embeddings=positions,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=pad_token_id,
        **extra,
    )


def te1_config(size: Literal["tiny", "full"]) -> CLIPTextConfig:
    """CLIP ViT-L/14 text model (full) or its 64-wide, 3-layer stand-in (tiny)."""
    width, layers, mlp = {"full": (768, 12, 3072), "tiny": (64, 3, 256)}[size]
    return _clip_text_config(
        width=width, layers=layers, mlp=mlp, act="quick_gelu", vocab=49408, positions=77, pad_token_id=EOS_TOKEN_ID
    )


def te2_config(size: Literal["tiny", "full"]) -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14 text model with its projection (full) or a 64-wide, 3-layer stand-in (tiny)."""
    width, layers, mlp = {"full": (1280, 32, 5120), "tiny": (64, 3, 256)}[size]
    return _clip_text_config(
        width=width, layers=layers, mlp=mlp, act="gelu", vocab=49408, positions=77,
        pad_token_id=TE2_PAD_TOKEN_ID, projection_dim=width,
    )


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, prefix: str, what: str, rank: int) -> tuple[int, ...]:
    if key not in shapes:
        raise LorakitError(f"checkpoint key {prefix}{key} is missing; expected {what}")
    shape = tuple(shapes[key])
    if len(shape) != rank:
        raise LorakitError(f"checkpoint key {prefix}{key} has shape {list(shape)}; expected a {rank}-D tensor ({what})")
    return shape


def _layer_count(shapes: Mapping[str, tuple[int, ...]], stem: str, prefix: str, what: str) -> int:
    pattern = re.compile(re.escape(stem) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    if not indices or indices != set(range(len(indices))):
        found = sorted(indices)[:8]
        raise LorakitError(
            f"checkpoint keys {prefix}{stem}N.* have layer numbers {found}; expected {what} with layers 0..N-1"
        )
    return len(indices)


def te1_config_from_sgm(shapes: Mapping[str, tuple[int, ...]]) -> CLIPTextConfig:
    """TE1's config from the shapes of its SGM tensors (keys without TE1_PREFIX)."""
    what = "a CLIP text encoder (SDXL text encoder 1)"
    vocab, width = _shape(shapes, "text_model.embeddings.token_embedding.weight", TE1_PREFIX, what, 2)
    positions, _ = _shape(shapes, "text_model.embeddings.position_embedding.weight", TE1_PREFIX, what, 2)
    layers = _layer_count(shapes, "text_model.encoder.layers.", TE1_PREFIX, what)
    mlp, _ = _shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", TE1_PREFIX, what, 2)
    return _clip_text_config(
        width=width, layers=layers, mlp=mlp, act="quick_gelu", vocab=vocab, positions=positions,
        pad_token_id=EOS_TOKEN_ID,
    )


def te2_config_from_sgm(shapes: Mapping[str, tuple[int, ...]]) -> CLIPTextConfig:
    """TE2's config from the shapes of its OpenCLIP-layout SGM tensors (keys without TE2_PREFIX)."""
    what = "an OpenCLIP text encoder (SDXL text encoder 2)"
    vocab, width = _shape(shapes, "token_embedding.weight", TE2_PREFIX, what, 2)
    positions, _ = _shape(shapes, "positional_embedding", TE2_PREFIX, what, 2)
    layers = _layer_count(shapes, "transformer.resblocks.", TE2_PREFIX, what)
    mlp, _ = _shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", TE2_PREFIX, what, 2)
    if _TE2_LINEAR_PROJECTION in shapes:
        projection_dim, _ = _shape(shapes, _TE2_LINEAR_PROJECTION, TE2_PREFIX, what, 2)
    else:
        _, projection_dim = _shape(shapes, "text_projection", TE2_PREFIX, what, 2)
    return _clip_text_config(
        width=width, layers=layers, mlp=mlp, act="gelu", vocab=vocab, positions=positions,
        pad_token_id=TE2_PAD_TOKEN_ID, projection_dim=projection_dim,
    )


def _te1_names(config: CLIPTextConfig) -> list[str]:
    """TE1's parameter names in SGM (= transformers, with `text_model.`) spelling."""
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    for i in range(config.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"{layer}{module}.{p}" for p in _PARAMS]
    names += [f"final_layer_norm.{p}" for p in _PARAMS]
    return [_TEXT_MODEL + name for name in names]


@functools.lru_cache(maxsize=1)
def _te1_state_prefix() -> str:
    """`text_model.` when this transformers' CLIPTextModel wraps one (< 5.6), "" when it is flat (>= 5.6)."""
    tiny = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    with torch.device("meta"):
        model = CLIPTextModel(tiny)
    return _TEXT_MODEL if hasattr(model, "text_model") else ""


def _check_keys(source: Mapping[str, Tensor], expected: set[str], ignored: set[str], prefix: str, what: str) -> None:
    keys = set(source.keys())
    missing = sorted(expected - keys)
    unexpected = sorted(keys - expected - ignored)
    if missing:
        raise LorakitError(
            f"{len(missing)} key(s) of {what} missing, e.g. {prefix}{missing[0]}; the checkpoint is incomplete"
        )
    if unexpected:
        raise LorakitError(
            f"{len(unexpected)} unexpected key(s) for {what}, e.g. {prefix}{unexpected[0]}; "
            "expected only the tensors of its layers"
        )


def te1_to_diffusers(sgm: Mapping[str, Tensor], config: CLIPTextConfig) -> dict[str, Tensor]:
    """SGM TE1 tensors -> `CLIPTextModel.state_dict()` keys of the installed transformers."""
    names = _te1_names(config)
    _check_keys(sgm, set(names), _TE1_IGNORED, TE1_PREFIX, "text encoder 1 (CLIP ViT-L)")
    prefix = _te1_state_prefix()
    return {prefix + name.removeprefix(_TEXT_MODEL): sgm[name] for name in names}


def te1_to_sgm(state: Mapping[str, Tensor], config: CLIPTextConfig) -> dict[str, Tensor]:
    """`CLIPTextModel.state_dict()` (flat or `text_model.`-wrapped) -> SGM TE1 tensors."""
    flat = not any(key.startswith(_TEXT_MODEL) for key in state)
    names = _te1_names(config)
    sources = {name: name.removeprefix(_TEXT_MODEL) if flat else name for name in names}
    _check_keys(state, set(sources.values()), {"embeddings.position_ids"} | _TE1_IGNORED, "", "a CLIPTextModel")
    return {name: state[source] for name, source in sources.items()}


def _te2_layer_pairs(config: CLIPTextConfig) -> list[tuple[str, str]]:
    """(transformers name, OpenCLIP name) for every TE2 tensor that maps one to one."""
    pairs = [
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ]
    for i in range(config.num_hidden_layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for hf_module, oc_module in (*_LAYER_NORMS, *_MLP, ("self_attn.out_proj", "attn.out_proj")):
            pairs += [(f"{hf}{hf_module}.{p}", f"{oc}{oc_module}.{p}") for p in _PARAMS]
    pairs += [(f"text_model.final_layer_norm.{p}", f"ln_final.{p}") for p in _PARAMS]
    return pairs


def _te2_fused(config: CLIPTextConfig) -> list[tuple[str, str, str]]:
    """(transformers q/k/v prefix, parameter, OpenCLIP fused name) for every attention block."""
    return [
        (f"text_model.encoder.layers.{i}.self_attn.", p, f"transformer.resblocks.{i}.attn.in_proj_{p}")
        for i in range(config.num_hidden_layers)
        for p in _PARAMS
    ]


def te2_to_diffusers(sgm: Mapping[str, Tensor], config: CLIPTextConfig) -> dict[str, Tensor]:
    """OpenCLIP-layout SGM TE2 tensors -> `CLIPTextModelWithProjection.state_dict()` keys.

    `logit_scale` has no transformers counterpart and is not read (te2_to_sgm can write it back).
    """
    pairs, fused = _te2_layer_pairs(config), _te2_fused(config)
    linear_projection = _TE2_LINEAR_PROJECTION in sgm
    projection = _TE2_LINEAR_PROJECTION if linear_projection else "text_projection"
    expected = {oc for _, oc in pairs} | {oc for _, _, oc in fused} | {projection}
    _check_keys(sgm, expected, _TE2_IGNORED, TE2_PREFIX, "text encoder 2 (OpenCLIP ViT-bigG)")
    state = {hf: sgm[oc] for hf, oc in pairs}
    for hf, param, oc in fused:
        q, k, v = sgm[oc].chunk(3, dim=0)
        state.update({f"{hf}q_proj.{param}": q, f"{hf}k_proj.{param}": k, f"{hf}v_proj.{param}": v})
    # OpenCLIP computes `pooled = x @ text_projection` ([width, proj]); nn.Linear computes x @ weight.T, so the
    # weight is the transpose. sd-scripts copies it untransposed, which is wrong (its pooled vector differs).
    state["text_projection.weight"] = sgm[projection] if linear_projection else sgm[projection].T.contiguous()
    return state


def te2_to_sgm(
    state: Mapping[str, Tensor], config: CLIPTextConfig, *, logit_scale: Tensor | None = None
) -> dict[str, Tensor]:
    """`CLIPTextModelWithProjection.state_dict()` -> OpenCLIP-layout SGM TE2 tensors.

    `logit_scale` (OpenCLIP's contrastive temperature, unused by SDXL) is written only when given, so a checkpoint
    that had one keeps it and one that had none gains none.
    """
    pairs, fused = _te2_layer_pairs(config), _te2_fused(config)
    expected = {hf for hf, _ in pairs} | {"text_projection.weight"}
    expected |= {f"{hf}{qkv}_proj.{param}" for hf, param, _ in fused for qkv in "qkv"}
    _check_keys(state, expected, {"text_model.embeddings.position_ids"}, "", "a CLIPTextModelWithProjection")
    sgm = {oc: state[hf] for hf, oc in pairs}
    for hf, param, oc in fused:
        sgm[oc] = torch.cat([state[f"{hf}{qkv}_proj.{param}"] for qkv in "qkv"], dim=0)
    sgm["text_projection"] = state["text_projection.weight"].T.contiguous()
    if logit_scale is not None:
        sgm["logit_scale"] = logit_scale
    return sgm


# ---------------------------------------------------------------- SD 2.x: OpenCLIP ViT-H, run one layer short


def sd2_te_config(size: Literal["tiny", "full"]) -> CLIPTextConfig:
    """SD 2.x's text model as it runs: OpenCLIP ViT-H/14 without its last layer (23 of 24), or a tiny one."""
    width, layers, mlp = {"full": (1024, 23, 4096), "tiny": (64, 2, 256)}[size]
    return _clip_text_config(width=width, layers=layers, mlp=mlp, act="gelu", vocab=49408, positions=77,
                             pad_token_id=TE2_PAD_TOKEN_ID)


def sd2_te_config_from_sgm(shapes: Mapping[str, tuple[int, ...]]) -> CLIPTextConfig:
    """SD 2.x's text model from its OpenCLIP tensors (keys without SD2_TE_PREFIX): every layer but the last, which
    SD 2.x conditions on the penultimate of (sd-scripts and diffusers drop it too)."""
    what = "an OpenCLIP text encoder (SD 2.x)"
    vocab, width = _shape(shapes, "token_embedding.weight", SD2_TE_PREFIX, what, 2)
    positions, _ = _shape(shapes, "positional_embedding", SD2_TE_PREFIX, what, 2)
    layers = _layer_count(shapes, "transformer.resblocks.", SD2_TE_PREFIX, what)
    if layers < 2:
        raise LorakitError(f"{SD2_TE_PREFIX}transformer.resblocks: {layers} layer; expected at least 2 (SD 2.x "
                           "runs all but the last)")
    mlp, _ = _shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", SD2_TE_PREFIX, what, 2)
    return _clip_text_config(width=width, layers=layers - 1, mlp=mlp, act="gelu", vocab=vocab, positions=positions,
                             pad_token_id=TE2_PAD_TOKEN_ID)


def _sd2_unused(config: CLIPTextConfig) -> set[str]:
    """The OpenCLIP tensors SD 2.x does not run: the last layer, the projection and the temperature."""
    last = f"transformer.resblocks.{config.num_hidden_layers}."
    leaves = ["attn.in_proj_weight", "attn.in_proj_bias"] + [
        f"{module}.{p}" for module in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj", "attn.out_proj") for p in _PARAMS]
    return {last + leaf for leaf in leaves} | {"text_projection", "logit_scale"}


def sd2_te_to_diffusers(sgm: Mapping[str, Tensor], config: CLIPTextConfig) -> dict[str, Tensor]:
    """SD 2.x's OpenCLIP tensors -> `CLIPTextModel.state_dict()` keys (one layer fewer; no projection)."""
    pairs, fused = _te2_layer_pairs(config), _te2_fused(config)
    expected = {oc for _, oc in pairs} | {oc for _, _, oc in fused}
    _check_keys(sgm, expected, _sd2_unused(config), SD2_TE_PREFIX, "the SD 2.x text encoder (OpenCLIP ViT-H)")
    prefix = _te1_state_prefix()
    state = {prefix + hf.removeprefix(_TEXT_MODEL): sgm[oc] for hf, oc in pairs}
    for hf, param, oc in fused:
        q, k, v = sgm[oc].chunk(3, dim=0)
        hf = prefix + hf.removeprefix(_TEXT_MODEL)
        state.update({f"{hf}q_proj.{param}": q, f"{hf}k_proj.{param}": k, f"{hf}v_proj.{param}": v})
    return state


def sd2_te_to_sgm(state: Mapping[str, Tensor], config: CLIPTextConfig) -> dict[str, Tensor]:
    """`CLIPTextModel.state_dict()` of SD 2.x -> OpenCLIP tensors, with the last layer, projection and temperature
    an SD 2.x checkpoint carries written as zeros (the model never runs them)."""
    flat = not any(key.startswith(_TEXT_MODEL) for key in state)

    def source(name: str) -> Tensor:
        return state[name.removeprefix(_TEXT_MODEL) if flat else name]

    pairs, fused = _te2_layer_pairs(config), _te2_fused(config)
    sgm = {oc: source(hf) for hf, oc in pairs}
    for hf, param, oc in fused:
        sgm[oc] = torch.cat([source(f"{hf}{qkv}_proj.{param}") for qkv in "qkv"], dim=0)
    width, mlp = config.hidden_size, config.intermediate_size
    last = f"transformer.resblocks.{config.num_hidden_layers}."
    zeros = {"attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
             "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,), "ln_1.weight": (width,),
             "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,), "mlp.c_fc.weight": (mlp, width),
             "mlp.c_fc.bias": (mlp,), "mlp.c_proj.weight": (width, mlp), "mlp.c_proj.bias": (width,)}
    dtype = next(iter(sgm.values())).dtype
    sgm |= {last + leaf: torch.zeros(shape, dtype=dtype) for leaf, shape in zeros.items()}
    sgm["text_projection"] = torch.zeros(width, width, dtype=dtype)
    return sgm
