"""SD 1.x and 2.x behind the model-family seam (`train_network.py`): their checkpoints load as diffusers reads them,
their LoRA layers and names follow sd-scripts' rule on the full-size architecture, diffusers' `load_lora_weights`
consumes a saved file and gives lorakit's outputs, and `train_network.py` trains end to end (v-prediction for 2.x)."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights

from lorakit.errors import LorakitError
from lorakit.families import family_named
from lorakit.families.sd1 import SD_LORA
from lorakit.network.io import read_lora, save_network
from lorakit.network.network import build_network
from lorakit.testing.datasets import write_dataset_toml, write_image_folder
from lorakit.testing.random_models import random_components, write_diffusers, write_single_file
from lorakit.train.cli import main
from lorakit.train.preflight import matmul_rate

FAMILIES = ("sd1", "sd2")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    """(family name, random tiny components, the single file, the diffusers folder)."""
    name = request.param
    components = random_components("tiny", seed=0, family=name)
    folder = tmp_path_factory.mktemp(name)
    write_single_file(components, folder / "tiny.safetensors")
    write_diffusers(components, folder / "tiny-diffusers")
    return name, components, folder / "tiny.safetensors", folder / "tiny-diffusers"


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key.removeprefix("text_model."): value for key, value in module.state_dict().items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ours, theirs = state(a), state(b)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_single_file_and_folder_load_bit_exactly(model):
    name, components, single_file, folder = model
    family = family_named(name)
    for source in (single_file, folder):
        loaded = family.load(source)
        for attribute, module in components.networks().items():
            assert_same_weights(loaded.networks()[attribute], module)


def test_diffusers_from_single_file_reads_the_checkpoint_as_lorakit_does(model):
    """diffusers' own converter of original SD checkpoints is the independent reference (SD 2.x: it drops
    OpenCLIP's last layer and projection as lorakit does)."""
    from diffusers import StableDiffusionPipeline

    name, _, single_file, folder = model
    theirs = StableDiffusionPipeline.from_single_file(str(single_file), config=str(folder), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    ours = family_named(name).load(single_file)
    for attribute in ("unet", "text_encoder", "vae"):
        assert_same_weights(getattr(ours, attribute), getattr(theirs, attribute))


def full_size_network(name: str, conv: bool):
    """The full-size SD architecture on the meta device, with lorakit's network for it (dim 8)."""
    family = family_named(name)
    with init_empty_weights():
        modules = {part.attribute: part.build(part.config("full")) for part in family.layout.parts()}
    args = {"conv_dim": "8"} if conv else None
    return build_network(modules["unet"], [modules["text_encoder"]], network_dim=8, network_alpha=8,
                         network_args=args, lora=SD_LORA)


@pytest.mark.parametrize(("name", "conv", "unet", "text_encoder"), [
    ("sd1", False, 192, 72), ("sd1", True, 278, 72), ("sd2", False, 192, 138), ("sd2", True, 278, 138)])
def test_full_size_lora_modules_follow_sd_scripts(name, conv, unet, text_encoder):
    """sd-scripts' rule for SD 1.x/2.x: every Linear (and 1x1 conv) of the U-Net's Transformer2DModels, with
    conv_dim also those of ResnetBlock2D / Downsample2D / Upsample2D, and the Linears of CLIPAttention / CLIPMLP;
    U-Net names are diffusers paths, text-encoder names `lora_te_text_model_…` (12 layers for CLIP ViT-L, 23 run
    of OpenCLIP ViT-H's 24)."""
    network = full_size_network(name, conv)
    names = [lora.lora_name for lora in network.loras]
    assert len(network.loras_of("unet")) == unet and len(network.loras_of("te")) == text_encoder
    assert len(set(names)) == len(names)
    layers = 23 if name == "sd2" else 12
    expected = {
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
        "lora_unet_up_blocks_1_attentions_0_proj_out",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        f"lora_te_text_model_encoder_layers_{layers - 1}_mlp_fc2",
    }
    if conv:
        expected |= {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv",
                     "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_mid_block_resnets_1_time_emb_proj"}
    assert expected <= set(names)
    assert all(n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_te_text_model_encoder_layers_")) for n in names)


def test_diffusers_load_lora_weights_consumes_every_key_and_gives_our_outputs(model, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    name, components, _, _ = model
    unet, text_encoder = copy.deepcopy(components.unet), copy.deepcopy(components.text_encoder)
    network = build_network(unet, [text_encoder], network_dim=4, network_alpha=2, network_args={"conv_dim": "2"},
                            lora=SD_LORA)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.05)
    network.attach()
    path = tmp_path / "sd_lora.safetensors"
    save_network(network, path, metadata={"ss_network_module": "networks.lora"})

    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 49407, (2, 77), generator=generator)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700])

    def outputs(unet_model, encoder) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            context = encoder(tokens).last_hidden_state
            return {"text": context, "unet": unet_model(sample, timesteps, context).sample}

    ours = outputs(unet, text_encoder)
    pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=copy.deepcopy(components.text_encoder),
                                   tokenizer=components.tokenizer, unet=copy.deepcopy(components.unet),
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    base = outputs(pipe.unet, pipe.text_encoder)
    state_dict, alphas = pipe.lora_state_dict(str(path))
    consumed = {key.split(".")[0] for key in read_lora(path)[0]}
    assert consumed == {lora.lora_name for lora in network.loras}
    pipe.load_lora_weights(str(path))
    theirs = outputs(pipe.unet, pipe.text_encoder)
    loaded = [m for m in (*pipe.unet.modules(), *pipe.text_encoder.modules()) if hasattr(m, "lora_A")]
    assert len(loaded) == len(network.loras)  # every module of the file, none dropped
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max() <= 1e-5, key
        assert (ours[key] - base[key]).abs().max() > 1e-3, key  # the LoRA does change the output
    assert state_dict and alphas is not None


def native_bf16() -> bool:
    return matmul_rate(torch.bfloat16) >= 0.5 * matmul_rate(torch.float32)


@pytest.mark.slow
def test_train_network_trains_with_the_seed_command(model, tmp_path):
    """sd-scripts' train_network.py command line, scaled down: caches, gradient checkpointing, bf16 where the CPU
    has it natively; SD 2.x as a v-prediction 768 model."""
    name, _, single_file, _ = model
    write_image_folder(tmp_path / "img", 3, sizes=((64, 64), (96, 64), (64, 96)))
    dataset = write_dataset_toml(tmp_path / "dataset.toml", tmp_path / "img", resolution=64)
    extra = ["--v2", "--v_parameterization"] if name == "sd2" else []
    argv = [f"--pretrained_model_name_or_path={single_file}", f"--dataset_config={dataset}",
            f"--output_dir={tmp_path / 'out'}", "--output_name=lora", "--network_module=networks.lora",
            "--network_dim=4", "--network_alpha=2", "--learning_rate=1e-3", "--max_train_steps=4",
            f"--mixed_precision={'bf16' if native_bf16() else 'no'}", "--gradient_checkpointing", "--cache_latents",
            "--cache_text_encoder_outputs", "--seed=3", "--max_data_loader_n_workers=0", *extra]
    assert main(argv, prog="train_network.py", family="sd1") == 0
    tensors, metadata = read_lora(tmp_path / "out" / "lora.safetensors")
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)  # cached text: the U-Net only
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(torch.count_nonzero(t) for k, t in tensors.items() if k.endswith("lora_up.weight"))  # it trained
    if name == "sd2":
        assert (metadata["ss_v2"], metadata["ss_base_model_version"]) == ("True", "sd_v2_v")
        assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
        assert metadata["modelspec.prediction_type"] == "v"
    else:
        assert (metadata["ss_v2"], metadata["ss_base_model_version"]) == ("False", "sd_v1")
        assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_text_encoder_is_trained_with_its_own_learning_rate(tmp_path):
    components = random_components("tiny", seed=0, family="sd1")
    write_single_file(components, tmp_path / "tiny.safetensors")
    write_image_folder(tmp_path / "img", 2, sizes=((64, 64),))
    dataset = write_dataset_toml(tmp_path / "dataset.toml", tmp_path / "img", resolution=64)
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "tiny.safetensors"), "--dataset_config", str(dataset),
            "--output_dir", str(tmp_path / "out"), "--network_dim", "2", "--max_train_steps", "2", "--unet_lr", "0",
            "--text_encoder_lr", "1e-2", "--clip_skip", "2", "--seed", "1", "--max_data_loader_n_workers", "0"]
    assert main(argv, prog="train_network.py", family="sd1") == 0
    tensors, metadata = read_lora(tmp_path / "out" / "last.safetensors")
    ups = {key: tensor for key, tensor in tensors.items() if key.endswith("lora_up.weight")}
    assert all(torch.count_nonzero(t) == 0 for k, t in ups.items() if k.startswith("lora_unet_"))  # lr 0: frozen
    assert any(torch.count_nonzero(t) for k, t in ups.items() if k.startswith("lora_te_text_model_"))
    assert metadata["ss_text_encoder_lr"] == "0.01" and metadata["ss_clip_skip"] == "2"


def test_model_family_comes_from_the_entry_point_or_the_flag_and_v2_picks_sd2():
    from lorakit.config import parse_train_args
    from lorakit.errors import LorakitError

    base = ["--pretrained_model_name_or_path", "m.safetensors", "--dataset_config", "d.toml"]
    assert parse_train_args(base).model_family == "sdxl"  # sdxl_train_network.py, lorakit train
    assert parse_train_args(base, family="sd1").model_family == "sd1"  # train_network.py
    sd2 = parse_train_args(base + ["--v2"], family="sd1")
    assert (sd2.model_family, sd2.v2) == ("sd2", True)
    assert parse_train_args(base + ["--model_family", "sd2"]).v2  # SD 2.x is a v2 model
    assert parse_train_args(base + ["--model_family", "sd1"]).model_family == "sd1"
    with pytest.raises(LorakitError, match=r"^--v2 does not apply to --model_family sdxl \(SDXL has no v2"):
        parse_train_args(base + ["--v2"])
    with pytest.raises(LorakitError, match=r"^--text_encoder_lr2 does not apply to --model_family sd1 \(SD 1.x/2.x"):
        parse_train_args(base + ["--text_encoder_lr2", "1e-5"], family="sd1")
    with pytest.raises(LorakitError, match="SD 1.x/2.x have one text encoder, so expected one rate"):
        parse_train_args(base + ["--text_encoder_lr", "1e-5", "2e-5"], family="sd1")


def test_train_package_reaches_families_only_through_the_seam():
    """Every module of lorakit.train imports the registry (`lorakit.families`) or the adapter's base class, never a
    family's own module: a new family must not need the trainer edited."""
    import ast
    import pathlib

    import lorakit.train

    allowed = {"lorakit.families", "lorakit.families.base"}
    found: set[str] = set()
    for path in sorted(pathlib.Path(lorakit.train.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            found |= {f"{path.name}: {name}" for name in names
                      if name.startswith("lorakit.families") and name not in allowed}
    assert not found and len(list(pathlib.Path(lorakit.train.__file__).parent.glob("*.py"))) > 10


def test_block_wise_network_args_are_refused_for_sd_models():
    components = random_components("tiny", seed=0, family="sd1")
    for key, value in (("down_lr_weight", ",".join(["0.5"] * 12)), ("block_dims", ",".join(["4"] * 25))):
        with pytest.raises(LorakitError, match=rf"^--network_args {key}: block-wise ranks and learning rates follow "
                                               "SDXL's 23 U-Net blocks"):
            build_network(components.unet, [components.text_encoder], network_dim=4, lora=SD_LORA,
                          network_args={key: value})
