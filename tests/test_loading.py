"""load_sdxl: round trips, diffusers' own single-file loader as the independent reference, dtypes, --vae, and one
clear line for every kind of bad input."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit import cli
from lorakit.hashing import legacy_model_hash, sha256_file
from lorakit.models import SDXLComponents, load_sdxl
from lorakit.models.components import sdxl_parts
from lorakit.testing.random_models import (SGMPart, random_components, write_safetensors_stream,
                                           write_single_file)

NETWORKS = ("unet", "vae", "text_encoder1", "text_encoder2")


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module | dict, dtype: torch.dtype | None = None):
    """Every tensor present in both, bit-equal (after casting `expected` to `dtype` when given)."""
    ours = loaded.state_dict()
    theirs = expected if isinstance(expected, dict) else expected.state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        want = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert ours[key].dtype == want.dtype, key
        assert torch.equal(ours[key], want), key


@pytest.fixture(scope="module")
def loaded(tiny_single_file: Path) -> SDXLComponents:
    return load_sdxl(tiny_single_file)


# ---------------------------------------------------------------- round trips and the independent reference


def test_single_file_round_trip_is_bit_exact(loaded: SDXLComponents, tiny_components: SDXLComponents) -> None:
    for name in NETWORKS:
        assert_same_weights(getattr(loaded, name), getattr(tiny_components, name))
    assert loaded.unet.config.cross_attention_dim == tiny_components.unet.config.cross_attention_dim == 128


def test_diffusers_folder_round_trip_is_bit_exact(tiny_diffusers_dir: Path, tiny_components: SDXLComponents) -> None:
    components = load_sdxl(tiny_diffusers_dir)
    for name in NETWORKS:
        assert_same_weights(getattr(components, name), getattr(tiny_components, name))
    assert components.identity.name == "tiny-sdxl"
    assert components.identity.legacy_hash == "IsADirectory" and components.identity.sha256 is None


def test_diffusers_from_single_file_loads_the_same_weights(loaded: SDXLComponents, tiny_single_file: Path,
                                                           tiny_diffusers_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file

    pipeline = StableDiffusionXLPipeline.from_single_file(str(tiny_single_file), config=str(tiny_diffusers_dir),
                                                          local_files_only=True)
    assert_same_weights(loaded.unet, pipeline.unet)
    assert_same_weights(loaded.vae, pipeline.vae)
    assert_same_weights(loaded.text_encoder1, pipeline.text_encoder)
    # The pipeline picks TE2's converter by width, and the tiny TE1 and TE2 are both 64 wide, so it would read TE1
    # into TE2; diffusers' OpenCLIP converter itself is the reference (it transposes text_projection, like us).
    reference = convert_open_clip_checkpoint(loaded.text_encoder2, load_file(tiny_single_file),
                                             prefix="conditioner.embedders.1.model.")
    assert_same_weights(loaded.text_encoder2, reference)


def test_bf16_load_is_the_bf16_cast_of_the_fp32_weights(tiny_single_file: Path,
                                                          tiny_components: SDXLComponents) -> None:
    components = load_sdxl(tiny_single_file, dtype=torch.bfloat16)
    for name in NETWORKS:
        assert_same_weights(getattr(components, name), getattr(tiny_components, name), torch.bfloat16)


def test_fp16_file_loads_into_fp32(tiny_components: SDXLComponents, tmp_path: Path) -> None:
    path = tmp_path / "fp16.safetensors"
    write_single_file(tiny_components, path, dtype=torch.float16)
    components = load_sdxl(path)
    for name in NETWORKS:
        expected = {k: v.half().float() if v.is_floating_point() else v
                    for k, v in getattr(tiny_components, name).state_dict().items()}
        assert_same_weights(getattr(components, name), expected)


def test_loaded_weights_do_not_keep_the_file_mapped(loaded: SDXLComponents, tiny_single_file: Path) -> None:
    assert str(tiny_single_file) not in Path("/proc/self/maps").read_text()
    assert loaded.unet.conv_in.weight.untyped_storage().nbytes() == loaded.unet.conv_in.weight.nbytes


def test_ckpt_state_dict_loads_through_weights_only(tiny_components: SDXLComponents, tiny_single_file: Path,
                                                    tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_single_file), "global_step": 10}, path)
    components = load_sdxl(path)
    for name in NETWORKS:
        assert_same_weights(getattr(components, name), getattr(tiny_components, name))


def test_identity_names_the_file_and_hashes_it_only_when_asked(tiny_single_file: Path) -> None:
    components = load_sdxl(tiny_single_file)
    identity = components.identity
    assert identity.name == "tiny-sdxl.safetensors" and identity.path == str(tiny_single_file.resolve())
    assert "sha256" not in identity.__dict__  # not computed while loading
    assert identity.legacy_hash == legacy_model_hash(tiny_single_file)
    assert identity.sha256 == sha256_file(tiny_single_file)
    assert components.vae_identity is None


# ---------------------------------------------------------------- --vae


def _other_vae_state(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from lorakit.testing.random_models import random_network

    network = next(n for n in sdxl_parts() if n.attribute == "vae")
    vae = random_network(network, network.config("tiny"), seed, torch.float32)
    return vae, network.to_sgm(vae.state_dict(), network.config_of(vae))


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_vae_only_single_file_replaces_the_vae(tiny_single_file: Path, tmp_path: Path, prefix: str) -> None:
    vae, sgm = _other_vae_state(seed=7)
    path = tmp_path / "vae.safetensors"
    write_safetensors_stream([SGMPart(prefix, lambda: sgm, lambda: sgm)], path)
    components = load_sdxl(tiny_single_file, vae=path)
    assert_same_weights(components.vae, vae)
    assert components.vae_identity.name == "vae.safetensors"


def test_vae_from_a_diffusers_folder_and_from_a_full_checkpoint(tiny_single_file: Path, tiny_diffusers_dir: Path,
                                                                 tiny_components: SDXLComponents,
                                                                 tmp_path: Path) -> None:
    vae, _ = _other_vae_state(seed=8)
    vae.save_pretrained(tmp_path / "vae")
    assert_same_weights(load_sdxl(tiny_single_file, vae=tmp_path / "vae").vae, vae)
    assert_same_weights(load_sdxl(tiny_single_file, vae=tiny_diffusers_dir).vae, tiny_components.vae)
    other = random_components("tiny", seed=9)
    write_single_file(other, tmp_path / "other.safetensors")
    assert_same_weights(load_sdxl(tiny_single_file, vae=tmp_path / "other.safetensors").vae, other.vae)


# ---------------------------------------------------------------- hub ids (from the local cache)


@pytest.mark.slow  # a fresh interpreter, so the hub settings apply from its first import
def test_hub_id_loads_from_the_local_cache_and_fails_in_one_line_when_absent(tiny_diffusers_dir: Path,
                                                                             tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--lorakit-test--tiny-sdxl" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    os.symlink(tiny_diffusers_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    script = ("from lorakit.models import load_sdxl; from lorakit.errors import LorakitError\n"
              "print(load_sdxl('lorakit-test/tiny-sdxl').identity)\n"
              "try: load_sdxl('lorakit-test/absent')\n"
              "except LorakitError as e: print('ERROR', e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ModelIdentity(name='lorakit-test/tiny-sdxl', path=None)"
    assert lines[1].startswith("ERROR cannot load UNet2DConditionModel from lorakit-test/absent/unet") and len(lines) == 2


# ---------------------------------------------------------------- bad input: one line through the CLI error path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This module doubles as a `lorakit` subcommand that only loads a model, to test the CLI's error path."""
    parser.add_argument("path")
    parser.add_argument("--vae")


def run(args: argparse.Namespace) -> int:
    load_sdxl(args.path, vae=args.vae)
    return 0


def _cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *argv: str) -> str:
    monkeypatch.setitem(cli.SUBCOMMANDS, "load", (__name__, "load a model"))
    assert cli.main(["load", *map(str, argv)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), captured.err
    return lines[0].removeprefix("lorakit: error: ")


def _sd15_like(path: Path) -> Path:
    save_file({
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 768),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
    }, path)
    return path


class NotATensor:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""


def test_missing_path(monkeypatch, capsys, tmp_path: Path) -> None:
    message = _cli_error(monkeypatch, capsys, tmp_path / "nope.safetensors")
    assert message.startswith(f"{tmp_path / 'nope.safetensors'}: no such file or folder")


def test_missing_vae_is_reported_before_loading_the_model(monkeypatch, capsys, tmp_path: Path) -> None:
    message = _cli_error(monkeypatch, capsys, tmp_path / "nope.safetensors", "--vae", tmp_path / "vae.safetensors")
    assert message.startswith(f"--vae {tmp_path / 'vae.safetensors'}: no such file or folder")


def test_folder_without_model_index(monkeypatch, capsys, tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    assert "folder without model_index.json" in _cli_error(monkeypatch, capsys, tmp_path)


def test_non_sdxl_diffusers_folder(monkeypatch, capsys, tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": []}))
    assert "names StableDiffusionPipeline without text_encoder_2" in _cli_error(monkeypatch, capsys, tmp_path)


def test_sd15_checkpoint(monkeypatch, capsys, tmp_path: Path) -> None:
    path = _sd15_like(tmp_path / "v1-5.safetensors")
    assert _cli_error(monkeypatch, capsys, path) == (
        f"{path} does not look like an SDXL checkpoint: it looks like SD 1.x "
        "(cond_stage_model.transformer.* keys, U-Net cross-attention width 768)")


def test_lora_file(monkeypatch, capsys, tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8)}, path)
    assert "it looks like a LoRA file (key lora_unet_input_blocks_4_1_proj_in.lora_down.weight)" in \
        _cli_error(monkeypatch, capsys, path)


@pytest.mark.parametrize("keep", [100, 0.5])
def test_truncated_safetensors(monkeypatch, capsys, tiny_single_file: Path, tmp_path: Path, keep) -> None:
    data = tiny_single_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    message = _cli_error(monkeypatch, capsys, path)
    assert message.startswith(f"{path}: not a complete .safetensors file") and "truncated" in message


def test_ckpt_with_an_arbitrary_pickled_object(monkeypatch, capsys, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": NotATensor()}, path)
    assert _cli_error(monkeypatch, capsys, path) == (
        f"{path} holds pickled objects other than tensors; refusing to unpickle it (convert it to .safetensors)")


def test_vae_argument_that_is_not_a_vae(monkeypatch, capsys, tiny_single_file: Path, tmp_path: Path) -> None:
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, lora)
    assert f"--vae {lora} holds no VAE: it looks like a LoRA file" in \
        _cli_error(monkeypatch, capsys, tiny_single_file, "--vae", lora)

