"""LoRA, DoRA, LoHa and LoKr modules: the weight change each computes equals the paper's formula written here, the
lycoris-lora package computes the same branch from our tensors, files round-trip bit-exactly and read back with
their kinds (--dim_from_weights, inspect), diffusers' load_lora_weights consumes every key of a DoRA file, each kind
learns on the tiny model, and the --network_args that choose them (networks.lora and lycoris.kohya) are checked."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lorakit.cli import main as lorakit_main
from lorakit.errors import LorakitError
from lorakit.network import build_network, load_network_weights, network_from_file, read_lora, save_network
from lorakit.network.args import parse_network_args
from lorakit.network.module import ALGOS
from lorakit.testing.random_models import random_components
from test_training import LEARNING_MARGIN, STEPS, loss_before_and_after, one_image, run  # noqa: F401

KINDS = ("lora", "dora", "loha", "lokr")
LAYERS = {"linear": lambda: nn.Linear(48, 40), "conv1x1": lambda: nn.Conv2d(32, 40, 1),
          "conv3x3": lambda: nn.Conv2d(32, 40, 3, padding=1)}
# (rank, alpha): LoKr keeps w2 whole at rank 4 (4 ≥ 8/2) and factors it at rank 2, where alpha/rank = 0.5 applies.
RANKS = ((4, 2.0), (2, 1.0))


def randomised(module, seed: int = 0):
    """Every trained tensor random (a fresh module's change is 0 by design), the DoRA magnitude near the norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(parameter * (1 + 0.1 * noise) if name == "dora_scale" else 0.3 * noise)
    return module


def layer_input(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (2, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels, 6, 6)
    return torch.randn(shape, generator=generator)


def paper_delta(kind: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW from the definitions, in float64: LoRA's B·A, DoRA's m·V/‖V‖_c − W, LoHa's (B1A1) ⊙ (B2A2), LoKr's
    w1 ⊗ w2 (each output channel (i, j) and input channel (k, l) of the product is w1[i, k] · w2[j, l])."""
    t = {key: value.double() for key, value in tensors.items()}
    weight = weight.double()
    out_channels, in_channels, *kernel = weight.shape
    if kind in ("lora", "dora"):
        rank = t["lora_down.weight"].shape[0]
        down = t["lora_down.weight"].reshape(rank, in_channels, *kernel)
        up = t["lora_up.weight"].reshape(out_channels, rank)
        low_rank = torch.einsum("or,ri...->oi...", up, down) * float(t["alpha"]) / rank
        if kind == "lora":
            return low_rank
        direction = weight + low_rank
        norms = direction.reshape(out_channels, -1).norm(dim=1)
        magnitude = t["dora_scale"].reshape(out_channels)
        return (magnitude / norms).reshape(-1, *[1] * (weight.dim() - 1)) * direction - weight
    if kind == "loha":
        rank = t["hada_w1_b"].shape[0]
        product = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return product.reshape(weight.shape) * float(t["alpha"]) / rank
    w1 = t["lokr_w1"]
    a, c = w1.shape
    b, d = out_channels // a, in_channels // c
    if "lokr_w2" in t:
        w2, scale = t["lokr_w2"], 1.0
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(b, d, *kernel)
        scale = float(t["alpha"]) / t["lokr_w2_a"].shape[1]
    return torch.einsum("ik,jl...->ijkl...", w1, w2).reshape(weight.shape) * scale


@pytest.mark.parametrize("rank_alpha", RANKS, ids=lambda ra: f"rank{ra[0]}")
@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_weight_change_and_output_follow_the_papers_formula(kind, layer_name, rank_alpha):
    torch.manual_seed(0)
    layer = LAYERS[layer_name]()
    module = randomised(ALGOS[kind]("lora_unet_x", layer, *rank_alpha, multiplier=0.7))
    expected = paper_delta(kind, dict(module.state_dict()), layer.weight.detach()) * 0.7
    assert (module.delta_weight().double() - expected).abs().max() < 1e-6
    x = layer_input(layer)
    with torch.no_grad():
        plain = layer(x)
        module.attach()
        adapted = layer(x)
        module.detach()
        merged = (F.linear(x, layer.weight + expected.float(), layer.bias) if layer_name == "linear"
                  else F.conv2d(x, layer.weight + expected.float(), layer.bias, padding=layer.padding))
    assert (adapted - merged).abs().max() < 1e-5
    assert (adapted - plain).abs().max() > 1e-2  # the module does change the layer



@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_gives_the_hooked_output_and_unmerge_restores_the_layer(kind, layer_name):
    torch.manual_seed(0)
    layer = LAYERS[layer_name]()
    original = layer.weight.detach().clone()
    module = randomised(ALGOS[kind]("lora_unet_x", layer, 4, 2.0, multiplier=0.5)).eval()
    x = layer_input(layer)
    with torch.no_grad():
        module.attach()
        hooked = layer(x)
        module.merge()
        assert not module.attached and (layer(x) - hooked).abs().max() < 1e-5
        module.unmerge()
        assert module.attached and (layer.weight - original).abs().max() < 1e-6
        assert (layer(x) - hooked).abs().max() < 1e-5


@pytest.mark.parametrize("rank_alpha", RANKS, ids=lambda ra: f"rank{ra[0]}")
@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("kind", KINDS)
def test_lycoris_computes_the_same_branch_from_our_tensors(kind, layer_name, rank_alpha):
    modules = pytest.importorskip("lycoris.modules")
    layer = LAYERS[layer_name]()
    ours = randomised(ALGOS[kind]("lora_unet_x", layer, *rank_alpha)).eval()
    state = {f"lora_unet_x.{key}": value for key, value in ours.state_dict().items()}
    lycoris_type, parameters = modules.get_module(state, "lora_unet_x")
    theirs = modules.make_module(lycoris_type, parameters, "lora_unet_x", layer).eval()
    x = layer_input(layer)
    with torch.no_grad():
        their_branch = theirs(x) - layer(x)  # LyCORIS' forward: the layer with its change, less the layer
        ours.attach()
        our_branch = layer(x) - (ours.detach() or layer(x))
    assert (our_branch - their_branch).abs().max() < 1e-5
    assert our_branch.abs().max() > 1e-2


@pytest.fixture(scope="module")
def tiny():
    return random_components("tiny", seed=0)


@pytest.mark.parametrize("kind", KINDS)
def test_files_round_trip_bit_exactly_and_read_back_with_their_kind(kind, tiny, tmp_path, capsys):
    unet, te1 = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder1)
    network = build_network(unet, [te1], network_dim=4, network_alpha=2,
                            network_args={"algo": kind, "conv_dim": "2", "conv_alpha": "1"})
    randomised(network)
    assert network.kinds == {kind} and any(lora.is_conv and lora.base.kernel_size == (3, 3) for lora in network.loras)
    path = tmp_path / f"{kind}.safetensors"
    save_network(network, path, metadata={"ss_network_args": json.dumps({"algo": kind})})
    state, _ = read_lora(path)
    assert state.keys() == network.state_dict().keys()
    # --dim_from_weights: the same modules from the file alone, then --network_weights loads them bit for bit.
    rebuilt = network_from_file(copy.deepcopy(tiny.unet), [copy.deepcopy(tiny.text_encoder1)], state, path)
    load_network_weights(rebuilt, path)
    assert {k: (type(v), v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: (type(v), v.shape) for k, v in network.state_dict().items()}
    assert all(torch.equal(rebuilt.state_dict()[key], value) for key, value in network.state_dict().items())
    assert lorakit_main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["types"] == {kind: len(network.loras)}


def test_diffusers_converts_every_key_of_a_dora_file_and_peft_gives_our_outputs(tiny, tmp_path):
    """diffusers 0.42's `load_lora_weights` drops the `dora_scale` keys of kohya-format files with a warning (its
    `lora_pipeline.py`), because PEFT wants the magnitude as [out] where LyCORIS' format has [out, 1]. Its kohya
    converter does take every key; loaded through `load_lora_into_unet` with the magnitudes flattened, PEFT's
    DoRA gives our outputs."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    unet = copy.deepcopy(tiny.unet)
    network = randomised(build_network(unet, [], network_dim=4, network_alpha=2, network_args={"algo": "dora"},
                                       train_text_encoder=False), seed=3)
    path = tmp_path / "dora.safetensors"
    save_network(network, path)
    state = dict(read_lora(path)[0])
    count = len(state)
    theirs = copy.deepcopy(tiny.unet)
    state = _maybe_map_sgm_blocks_to_diffusers(state, theirs.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    assert state == {} and len(converted) + len(alphas) == count  # every key taken
    assert sum("lora_magnitude_vector" in key for key in converted) == len(network.loras)
    converted = {key: value.flatten() if "lora_magnitude_vector" in key else value for key, value in converted.items()}
    StableDiffusionXLPipeline.load_lora_into_unet(converted, alphas, unet=theirs, adapter_name="dora")
    inputs = unet_inputs()
    with torch.no_grad():
        their_output = theirs(**inputs).sample
        network.attach()
        our_output = unet(**inputs).sample
        plain = tiny.unet(**inputs).sample
    assert (our_output - their_output).abs().max() < 1e-5 and (our_output - plain).abs().max() > 1e-2


def unet_inputs():
    generator = torch.Generator().manual_seed(7)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=generator), timestep=torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(2, 77, 128, generator=generator),
                added_cond_kwargs={"text_embeds": torch.randn(2, 64, generator=generator),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_each_kind_learns_on_the_tiny_model(kind, tiny_components, tiny_single_file, one_image,  # noqa: F811
                                           tmp_path):
    dataset, image = one_image
    result = run(tiny_single_file, dataset, tmp_path, "--max_train_steps", str(STEPS), "--learning_rate", "3e-2",
                 "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
                 "--optimizer_type", "AdamW", "--network_args", f"algo={kind}")
    _, metadata = read_lora(result.final_file)
    assert json.loads(metadata["ss_network_args"]) == {"algo": kind}
    before, after, network = loss_before_and_after(tiny_components, image, result.final_file)
    assert network.kinds == {kind}
    assert after < before - LEARNING_MARGIN, (before, after)


@pytest.mark.parametrize("values, message", [
    ({"algo": "ia3"}, "expected lora, locon, dora, loha or lokr (install lycoris-lora"),
    ({"algo": "loha", "dora_wd": "True"}, "DoRA is built on LoRA"),
    ({"factor": "4"}, "applies to algo=lokr only"),
    ({"algo": "lokr", "factor": "0"}, "expected -1"),
    ({"algo": "loha", "use_tucker": "True"}, "use_tucker=True: Tucker-decomposed convolutions are not built"),
    ({"algo": "lokr", "preset": "full"}, "preset=full: lorakit.s native modules train networks.lora.s layers"),
    ({"dora_wd": "yes"}, "expected True or False"),
])
def test_network_args_that_choose_a_kind_are_checked(values, message):
    with pytest.raises(LorakitError, match=message.replace("(", r"\(")):
        parse_network_args(values)


def test_kind_selection_and_lycoris_names():
    assert parse_network_args({"algo": "locon"}).kind == "lora"
    assert parse_network_args({"algo": "lora", "dora_wd": "True"}).kind == "dora"
    assert parse_network_args({"algo": "LoKr", "factor": "4"}).kind == "lokr"
    assert parse_network_args({"algo": "dora", "dora_wd": "True"}).kind == "dora"
    # LyCORIS switches at their defaults ask for nothing lorakit lacks.
    assert parse_network_args({"disable_conv_cp": "True", "wd_on_output": "True", "use_tucker": "False"}).kind == "lora"


def test_network_dropout_and_lora_plus_are_refused_for_kinds_that_build_the_weight(tiny):
    with pytest.raises(LorakitError, match="--network_dropout drops LoRA's rank activations; loha modules"):
        build_network(copy.deepcopy(tiny.unet), [], network_dim=4, dropout=0.1, network_args={"algo": "loha"},
                      train_text_encoder=False)
    with pytest.raises(LorakitError, match="LoRA's up matrices; the lokr modules have none"):
        build_network(copy.deepcopy(tiny.unet), [], network_dim=4, train_text_encoder=False,
                      network_args={"algo": "lokr", "loraplus_lr_ratio": "16"})


def test_a_file_decides_the_kinds_and_variants_not_built_are_refused_by_name(tiny, tmp_path):
    unet = copy.deepcopy(tiny.unet)
    network = randomised(build_network(unet, [], network_dim=4, network_args={"algo": "loha"},
                                       train_text_encoder=False))
    path = tmp_path / "loha.safetensors"
    save_network(network, path)
    state, _ = read_lora(path)
    for args, message in (({"loraplus_lr_ratio": "16"}, "the loha modules have none"),
                          ({"algo": "lokr"}, "algo=lokr: the --dim_from_weights file holds loha modules")):
        with pytest.raises(LorakitError, match=message):
            network_from_file(copy.deepcopy(tiny.unet), [], state, path, network_args=args)
    name = next(iter(state)).partition(".")[0]
    tucker = {**state, f"{name}.hada_t1": torch.zeros(4, 4, 3, 3)}
    with pytest.raises(LorakitError, match=rf"{name}\.hada_t1: a loha variant lorakit does not build"):
        network_from_file(copy.deepcopy(tiny.unet), [], tucker, path)
    foreign = {f"{name}.oft_blocks": torch.zeros(2, 2, 2)}
    with pytest.raises(LorakitError, match="not a LoRA, DoRA, LoHa or LoKr module"):
        network_from_file(copy.deepcopy(tiny.unet), [], foreign, path)


def test_a_lokr_factor_that_does_not_divide_the_layer_is_one_line():
    with pytest.raises(LorakitError, match="a 7x8 LoKr w1 does not divide the layer's 40x48 weight"):
        ALGOS["lokr"]("lora_unet_x", nn.Linear(48, 40), 4, 1.0, w1_shape=(7, 8))


def test_rank_dropout_rescales_only_when_asked():
    layer = nn.Linear(48, 40)
    weight = torch.ones(40, 48)
    for scale, expected in ((True, 2.0), (False, 1.0)):
        module = ALGOS["loha"]("lora_unet_x", layer, 4, 1.0, rank_dropout=0.5, rank_dropout_scale=scale).train()
        kept = module.dropped(weight)
        assert set(kept.unique().tolist()) <= {0.0, expected}
    assert parse_network_args({"rank_dropout_scale": "False"}).rank_dropout_scale is False


def test_merge_and_unmerge_refuse_to_run_twice():
    module = randomised(ALGOS["lora"]("lora_unet_x", nn.Linear(48, 40), 4, 1.0))
    with pytest.raises(RuntimeError, match="unmerge without merge"):
        module.unmerge()
    module.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        module.merge()
    module.unmerge()
    assert not module.attached  # it was not attached before merging


def test_lycoris_command_lines_get_lycoris_defaults():
    from lorakit.network.plugins import lycoris_defaults

    args, dropout = lycoris_defaults({"algo": "loha", "dropout": "0.1"}, 8, 4.0, None)
    assert args == {"algo": "loha", "conv_dim": "8", "conv_alpha": "4.0", "rank_dropout_scale": "False"}
    assert dropout == 0.1
    with pytest.raises(LorakitError, match="dropout=0.1 and --network_dropout 0.2 disagree"):
        lycoris_defaults({"dropout": "0.1"}, 8, 4.0, 0.2)
