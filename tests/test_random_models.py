"""Random SDXL-architecture models: seeded weights, the streamed SGM single file read back by safetensors itself,
diffusers folders that diffusers' pipeline loads, and `lorakit random-model`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorakit import cli
from lorakit.models.components import SDXLComponents, sdxl_parts
from lorakit.testing.random_models import (SGMPart, random_components, random_sgm_parts, write_random_single_file,
                                           write_safetensors_stream, write_single_file)

PREFIXES = ("model.diffusion_model.", "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.",
            "first_stage_model.")


def test_same_seed_same_weights_other_seed_other_weights(tiny_components: SDXLComponents) -> None:
    again = random_components("tiny", seed=0)
    other = random_components("tiny", seed=1)
    for name, module in tiny_components.networks().items():
        state, same, different = module.state_dict(), again.networks()[name].state_dict(), other.networks()[name]
        assert all(torch.equal(state[k], same[k]) for k in state), name
        assert not torch.equal(module.get_parameter(next(iter(dict(module.named_parameters())))),
                               different.get_parameter(next(iter(dict(different.named_parameters()))))), name


def test_weights_are_real_scaled_and_in_the_requested_dtype() -> None:
    components = random_components("tiny", seed=3, dtype=torch.bfloat16)
    for name, module in components.networks().items():
        for key, parameter in module.named_parameters():
            assert parameter.device.type == "cpu" and parameter.dtype == torch.bfloat16, (name, key)
            assert parameter.float().std() > 0, (name, key)
    linear = components.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.float()
    assert abs(linear.std().item() - linear.shape[1] ** -0.5) < 0.2 * linear.shape[1] ** -0.5
    norm = next(p for k, p in components.text_encoder1.named_parameters() if k.endswith("final_layer_norm.weight"))
    assert abs(norm.float().mean().item() - 1) < 0.02


def test_tiny_unet_runs_a_forward_pass(tiny_components: SDXLComponents) -> None:
    unet = tiny_components.unet
    added = {"text_embeds": torch.randn(2, 64), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 128),
                   added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 0


def test_single_file_is_sgm_layout_and_reads_back_with_safetensors(tiny_components: SDXLComponents,
                                                                   tiny_single_file: Path) -> None:
    with safe_open(tiny_single_file, "pt") as f:
        keys = set(f.keys())
        assert all(key.startswith(PREFIXES) for key in keys)
        assert {"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection",
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight"} <= keys
        for network in sdxl_parts():
            module = getattr(tiny_components, network.attribute)
            expected = network.to_sgm(module.state_dict(), network.config_of(module))
            assert {k for k in keys if k.startswith(network.prefix)} == {network.prefix + k for k in expected}
            for key, tensor in expected.items():
                assert torch.equal(f.get_tensor(network.prefix + key), tensor), key


def test_streamed_random_file_equals_the_in_memory_one_byte_for_byte(tiny_single_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "streamed.safetensors"
    write_random_single_file(path, "tiny", seed=0, dtype=torch.float32)
    assert path.read_bytes() == tiny_single_file.read_bytes()


def test_dtype_is_applied_to_floating_tensors_only(tiny_components: SDXLComponents, tmp_path: Path) -> None:
    path = tmp_path / "bf16.safetensors"
    write_single_file(tiny_components, path, dtype=torch.bfloat16)
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    dtypes = {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}
    assert dtypes <= {"BF16", "I64"} and "BF16" in dtypes
    with safe_open(path, "pt") as f:
        weight = f.get_tensor("model.diffusion_model.out.2.weight")
    assert torch.equal(weight, tiny_components.unet.conv_out.weight.detach().bfloat16())


def test_stream_refuses_a_part_that_differs_from_its_header(tmp_path: Path) -> None:
    part = SGMPart("x.", lambda: {"a": torch.zeros(2)}, lambda: {"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="other tensors than its header"):
        write_safetensors_stream([part], tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_full_size_header_has_sdxl_base_parameter_counts() -> None:
    counts = {}
    for network, part in zip(sdxl_parts(), random_sgm_parts("full", seed=0, dtype=torch.float16)):
        counts[network.attribute] = sum(t.numel() for t in part.header().values() if t.is_floating_point())
    assert counts["unet"] == 2_567_463_684
    assert round(counts["text_encoder1"] / 1e5) == 1231 and round(counts["text_encoder2"] / 1e5) == 6947
    assert round(counts["vae"] / 1e5) == 837


def test_diffusers_folder_loads_in_the_diffusers_pipeline(tiny_components: SDXLComponents,
                                                          tiny_diffusers_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_diffusers_dir, local_files_only=True)
    for ours, theirs in ((tiny_components.unet, pipeline.unet), (tiny_components.vae, pipeline.vae),
                         (tiny_components.text_encoder1, pipeline.text_encoder),
                         (tiny_components.text_encoder2, pipeline.text_encoder_2)):
        state = theirs.state_dict()
        assert all(torch.equal(tensor, state[key]) for key, tensor in ours.state_dict().items())
    scheduler = pipeline.scheduler.config
    assert (type(pipeline.scheduler).__name__, scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end,
            scheduler.num_train_timesteps) == ("EulerDiscreteScheduler", "scaled_linear", 0.00085, 0.012, 1000)
    assert pipeline.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (pipeline.tokenizer.pad_token, pipeline.tokenizer_2.pad_token) == ("<|endoftext|>", "!")


def test_cli_writes_a_tiny_single_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "cli.safetensors"
    assert cli.main(["random-model", str(path), "--size", "tiny", "--seed", "5", "--dtype", "fp16"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {path}: tiny SDXL, single-file, fp16, seed 5")
    with safe_open(path, "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
