"""LoRA files on the tiny SDXL model: diffusers as an independent reader, save/load, metadata, dim_from_weights,
apply_lora, base-weight merging, plug-ins and `lorakit inspect`."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lorakit.cli import main as lorakit_main
from lorakit.errors import LorakitError
from lorakit.hashing import safetensors_tensor_data, sshs_legacy_hash
from lorakit.models.unet import unet_module_paths
from lorakit.network import (LoRANetwork, apply_lora, build_modelspec, build_network, load_network_weights,
                             merge_lora, network_from_file, read_lora, remove_lora, save_network)
from lorakit.network.apply import to_sgm_names
from lorakit.network.io import DATASET_CONFIG_METADATA_KEYS, MODEL_HASH_METADATA_KEYS, TRAINER_METADATA_KEYS
from lorakit.network.plugins import create_network
from lorakit.testing.random_models import random_components, write_single_file

NETWORK_ARGS = {"conv_dim": "3", "conv_alpha": "1.5"}


@pytest.fixture(scope="module")
def tiny():
    return random_components("tiny", seed=0)


def unet_inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(7)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=generator), timestep=torch.tensor([10, 700])[:batch],
                encoder_hidden_states=torch.randn(batch, 77, 128, generator=generator),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 64, generator=generator),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)})


TOKENS = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(3))


def outputs(unet, te1, te2) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        te2_out = te2(TOKENS, output_hidden_states=True)
        return {"unet": unet(**unet_inputs()).sample,
                "te1": te1(TOKENS, output_hidden_states=True).hidden_states[-2],
                "te2": te2_out.hidden_states[-2], "te2_pooled": te2_out.text_embeds}


def assert_outputs_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    for key in a:
        assert (a[key] - b[key]).abs().max() <= atol, key


def fresh_models(tiny):
    return tuple(copy.deepcopy(m) for m in (tiny.unet, tiny.text_encoder1, tiny.text_encoder2))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """(models, network, path): a LoRA with conv layers trained 2 steps on copies of the tiny model, saved."""
    unet, te1, te2 = (m.requires_grad_(False) for m in fresh_models(tiny))
    network = build_network(unet, [te1, te2], network_dim=4, network_alpha=2, network_args=NETWORK_ARGS)
    network.attach()
    groups = network.parameter_groups(unet_lr=5e-2, text_encoder1_lr=5e-2, text_encoder2_lr=5e-2, learning_rate=None)
    optimizer = torch.optim.AdamW(groups)
    inputs = unet_inputs()
    for _ in range(2):
        te2_out = te2(TOKENS, output_hidden_states=True)
        context = torch.cat([te1(TOKENS, output_hidden_states=True).hidden_states[-2], te2_out.hidden_states[-2]], -1)
        added = {"text_embeds": te2_out.text_embeds, "time_ids": inputs["added_cond_kwargs"]["time_ids"]}
        prediction = unet(inputs["sample"], inputs["timestep"], context, added_cond_kwargs=added)
        loss = torch.nn.functional.mse_loss(prediction.sample, torch.zeros_like(prediction.sample))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    # TE1's last layer feeds nothing (penultimate states): give the few untrained modules random weights too.
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lora in network.loras:
            if torch.count_nonzero(lora.lora_up.weight) == 0:
                lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.05)
    path = tmp_path_factory.mktemp("lora") / "tiny_lora.safetensors"
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                **build_modelspec(title="tiny_lora", timestamp=1_800_000_000.0)}
    save_network(network, path, metadata=metadata)
    return (unet, te1, te2), network, path


def test_diffusers_load_lora_weights_reproduces_our_network(tiny, trained):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    (unet, te1, te2), network, path = trained
    ours = outputs(unet, te1, te2)
    pipe = StableDiffusionXLPipeline(vae=tiny.vae, text_encoder=copy.deepcopy(tiny.text_encoder1),
                                     text_encoder_2=copy.deepcopy(tiny.text_encoder2), tokenizer=tiny.tokenizer1,
                                     tokenizer_2=tiny.tokenizer2, unet=copy.deepcopy(tiny.unet),
                                     scheduler=EulerDiscreteScheduler())
    base = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    pipe.load_lora_weights(str(path))
    theirs = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert_outputs_close(ours, theirs)
    assert all((ours[key] - base[key]).abs().max() > 1e-3 for key in ours)  # the LoRA does change every output


def test_saved_file_round_trips_tensors_metadata_and_hashes(trained, tmp_path):
    _, network, path = trained
    tensors, metadata = read_lora(path)
    state = network.state_dict()
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)
    assert all(tensors[k].dim() == 0 for k in tensors if k.endswith(".alpha"))
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.title"] == "tiny_lora"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # sshs_model_hash covers the tensor bytes only; sshs_legacy_hash a serialisation with the ss_* keys only.
    data = safetensors_tensor_data(path.read_bytes())
    assert metadata["sshs_model_hash"] == hashlib.sha256(data).hexdigest()
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    assert metadata["sshs_legacy_hash"] == sshs_legacy_hash(safetensors.torch.save(tensors, ss_only))
    reread, reread_metadata = read_lora(path)
    assert reread_metadata == metadata

    half = tmp_path / "half.safetensors"
    save_network(network, half, dtype=torch.bfloat16, metadata=metadata)
    assert {t.dtype for t in read_lora(half)[0].values()} == {torch.bfloat16}
    pt = tmp_path / "plain.pt"
    save_network(network, pt)
    loaded = torch.load(pt, weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_metadata_hand_over_covers_every_key_of_the_reference_file(trained, tmp_path):
    reference = json.loads((Path(__file__).parent / "data" / "sdxl-lora-keys.json").read_text())
    _, network, _ = trained
    metadata = {key: "None" for key in TRAINER_METADATA_KEYS + DATASET_CONFIG_METADATA_KEYS + MODEL_HASH_METADATA_KEYS}
    metadata.update(build_modelspec(title="run", timestamp=1_800_000_000.0, resolution=(1024, 1024)))
    path = tmp_path / "meta.safetensors"
    save_network(network, path, metadata=metadata)
    assert set(reference["metadata"]) <= set(read_lora(path)[1])


def test_network_weights_load_into_a_fresh_network_and_take_the_files_alpha(tiny, trained, caplog):
    (unet, te1, te2), network, path = trained
    models = fresh_models(tiny)
    fresh = build_network(models[0], models[1:], network_dim=4, network_alpha=1, network_args=NETWORK_ARGS)
    fresh.attach()
    with caplog.at_level("INFO"):
        report = load_network_weights(fresh, path, unet=models[0])
    assert report.missing == [] and report.unexpected == []
    assert len(report.alpha_changed) == len(network.loras_of("te1")) + len(network.loras_of("te2")) + sum(
        1 for lora in network.loras_of("unet") if lora.lora_down.weight.shape[-1] != 3)
    assert "another alpha" in caplog.text
    assert_outputs_close(outputs(*models), outputs(unet, te1, te2))


def test_foreign_lora_files_are_refused_in_one_line(tiny, tmp_path):
    unet = copy.deepcopy(tiny.unet)
    network = build_network(unet, [], network_dim=4)
    sd15 = tmp_path / "sd15.safetensors"  # SD 1.x uses 1x1-conv proj_in: same name, other shape
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    safetensors.torch.save_file({f"{name}.lora_down.weight": torch.zeros(4, 64, 1, 1),
                                 f"{name}.lora_up.weight": torch.zeros(64, 4, 1, 1)}, sd15)
    with pytest.raises(LorakitError, match=r"input_blocks_4_1_proj_in.lora_down.weight has shape \(4, 64, 1, 1\)"):
        load_network_weights(network, sd15, unet=unet)
    te_only = tmp_path / "te.safetensors"
    safetensors.torch.save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 64)},
                                te_only)
    with pytest.raises(LorakitError, match="none of its 1 tensors matches"):
        load_network_weights(network, te_only, unet=unet)
    with pytest.raises(LorakitError, match="none of its 1 LoRA modules"):
        network_from_file(unet, [], read_lora(te_only)[0], te_only)


def to_diffusers_names(tensors: dict, unet) -> dict:
    back = {("lora_unet_" + sgm).replace(".", "_"): ("lora_unet_" + path).replace(".", "_")
            for path, sgm in unet_module_paths(dict(unet.config)).items()}
    return {back.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in tensors.items()}


def test_dim_from_weights_rebuilds_mixed_ranks_and_conv_layers(tiny, tmp_path):
    unet, te1, te2 = fresh_models(tiny)
    dims = ["4"] * 23
    dims[5], dims[14] = "2", "6"
    original = build_network(unet, [te1, te2], network_dim=4, network_alpha=2,
                             network_args={"block_dims": ",".join(dims), "conv_block_dims": ",".join(["3"] * 23)})
    tensors = {k: v for k, v in original.state_dict().items()}
    for name, tensors_of in (("sgm", tensors), ("diffusers", to_diffusers_names(tensors, unet))):
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file(tensors_of, path)
        rebuilt = network_from_file(unet, [te1, te2], to_sgm_names(read_lora(path)[0], unet), path)
        shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in tensors.items()}, name
    ranks = {lora.rank for lora in rebuilt.loras}
    assert ranks == {2, 3, 4, 6}
    assert any(lora.lora_down.weight.shape[-1] == 3 for lora in rebuilt.loras)
    assert any(key.startswith("lora_unet_down_blocks_") for key in to_diffusers_names(tensors, unet))


def test_apply_lora_reproduces_the_network_and_reapplying_replaces(tiny, trained, tmp_path):
    (unet, te1, te2), network, path = trained
    expected = outputs(unet, te1, te2)
    models = fresh_models(tiny)
    components = {"unet": models[0], "text_encoder1": models[1], "text_encoder2": models[2]}
    base = outputs(*models)
    apply_lora(components, path)
    assert_outputs_close(outputs(*models), expected)
    apply_lora(components, path, multiplier=0.5)  # replaces: the outputs are those of multiplier 0.5, not 1.5
    network.set_multiplier(0.5)
    try:
        assert_outputs_close(outputs(*models), outputs(unet, te1, te2))
    finally:
        network.set_multiplier(1.0)
    remove_lora(components, path)
    assert_outputs_close(outputs(*models), base, atol=0)
    diffusers_style = tmp_path / "diffusers_style.safetensors"
    safetensors.torch.save_file(to_diffusers_names(read_lora(path)[0], unet), diffusers_style)
    apply_lora(components, diffusers_style)
    assert_outputs_close(outputs(*models), expected)


def test_base_weights_merge_into_the_model(tiny, trained):
    (unet, te1, te2), network, path = trained
    models = fresh_models(tiny)
    assert merge_lora({"unet": models[0], "text_encoder1": models[1], "text_encoder2": models[2]}, path) == len(
        network.loras)
    assert not any(m._forward_hooks for model in models for m in model.modules())
    assert_outputs_close(outputs(*models), outputs(unet, te1, te2), atol=1e-4)


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny):
    grads = []
    for checkpointing in (False, True):
        unet = copy.deepcopy(tiny.unet).requires_grad_(False).train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        torch.manual_seed(0)
        network = build_network(unet, [], network_dim=2, network_args=NETWORK_ARGS)
        network.attach()
        for lora in network.loras:
            torch.nn.init.normal_(lora.lora_up.weight, std=0.01)
        unet(**unet_inputs(batch=1)).sample.square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in network.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


def test_plugins_resolve_lorakit_lycoris_and_any_sd_scripts_module(tiny, tmp_path, monkeypatch):
    unet = copy.deepcopy(tiny.unet)
    network = create_network("networks.lora", unet=unet, text_encoders=[tiny.text_encoder1, tiny.text_encoder2],
                             network_dim=4, network_alpha=1, train_text_encoder=False)
    assert isinstance(network, LoRANetwork) and len(network.loras) == len(network.loras_of("unet"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)  # as without lycoris-lora
    native = create_network("lycoris.kohya", unet=unet, text_encoders=[], network_dim=4, network_alpha=1,
                            network_args={"algo": "loha"}, train_text_encoder=False)
    assert isinstance(native, LoRANetwork) and native.kinds == {"loha"}
    assert any(lora.is_conv and lora.base.kernel_size == (3, 3) for lora in native.loras)  # LyCORIS' conv_dim
    with pytest.raises(LorakitError, match=r"pip install 'lorakit\[lycoris\]'"):
        create_network("lycoris.locon", unet=unet, text_encoders=[])
    monkeypatch.undo()
    (tmp_path / "my_adapter.py").write_text(
        "def create_network(multiplier, network_dim, network_alpha, vae, text_encoders, unet, **kwargs):\n"
        "    return ('called', multiplier, network_dim, network_alpha, len(text_encoders), sorted(kwargs))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    called = create_network("my_adapter", unet=unet, text_encoders=[tiny.text_encoder1, tiny.text_encoder2],
                            network_dim=8, network_alpha=4, network_args={"preset": "full"})
    assert called == ("called", 1.0, 8, 4, 2, ["dropout", "neuron_dropout", "preset"])
    with pytest.raises(LorakitError, match="no create_network"):
        create_network("json", unet=unet, text_encoders=[])


def test_inspect_reports_counts_for_lora_files_and_checkpoints(tiny, trained, tmp_path, capsys):
    _, network, path = trained
    assert lorakit_main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    parts = {part: len(network.loras_of(part)) for part in ("te1", "te2", "unet")}
    assert summary["kind"] == "lora" and summary["modules"] == parts
    assert summary["ranks"] == {"3": sum(1 for l in network.loras if l.rank == 3),
                                "4": sum(1 for l in network.loras if l.rank == 4)}
    assert summary["conv_layers"]["3x3"] > 0 and summary["dtypes"] == {"F32": len(network.state_dict())}
    assert summary["metadata"]["ss_network_module"] == "networks.lora"
    assert lorakit_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"unet {parts['unet']}" in text and "alphas: 1.5 x" in text and "conv layers: 1x1 x" in text
    checkpoint = tmp_path / "tiny.safetensors"
    write_single_file(tiny, checkpoint)
    assert lorakit_main(["inspect", str(checkpoint), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "checkpoint" and summary["architecture"] == "SDXL"
    assert summary["unet"]["block_out_channels"] == [32, 64, 128]
    assert lorakit_main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    ckpt = tmp_path / "lora.ckpt"
    torch.save({"state_dict": network.state_dict()}, ckpt)
    assert lorakit_main(["inspect", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"] == parts
    pickled = tmp_path / "object.pt"
    torch.save({"path": Path("not a tensor")}, pickled)
    assert lorakit_main(["inspect", str(pickled)]) == 2
    assert "refusing to unpickle it" in capsys.readouterr().err
