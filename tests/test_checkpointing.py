"""Gradient checkpointing to a memory budget: the peak model by hand, the meta measurement against a real forward,
and every plan the planner can make training bit-identical weights."""

from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from lorakit.config import parse_train_args
from lorakit.families import family_named
from lorakit.network.network import build_network
from lorakit.testing.random_models import random_components
from lorakit.train.checkpointing import (ActivationProfile, Segment, apply_plan, checkpoint_units, choose_units,
                                         measure_activations, measure_layers)
from lorakit.train.memory import Workload, estimate_memory, model_parts

SDXL = family_named("sdxl")


def by_hand() -> ActivationProfile:
    # forward order: 10 bytes outside, A (saves 100, input 10), 5 outside, B (50, 5), C (10, 1), 5 outside
    return ActivationProfile((Segment("A", 100, 10, 10), Segment("B", 50, 5, 15), Segment("C", 10, 1, 15)),
                             outside=20, unit_names=("A", "B", "C"))


def test_the_peak_is_the_start_of_backward_or_a_rebuilt_segment_on_what_precedes_it():
    profile = by_hand()
    assert profile.peak(set()) == 20 + 100 + 50 + 10
    # A rebuilt on the 10 outside bytes before it: 110; held at the start of backward: 20 + 10 + 50 + 10 = 90
    assert profile.peak({"A"}) == 110
    # B rebuilt on 15 outside + A's 10 kept: 75; held: 20 + 10 + 5 + 10 = 45; A still 110
    assert profile.peak({"A", "B"}) == 110
    assert profile.peak({"B"}) == max(15 + 100 + 50, 20 + 100 + 5 + 10)
    assert [profile.saving(name) for name in "ABC"] == [90, 45, 9]


def test_the_fewest_units_largest_saving_first_that_fit_the_budget():
    profile = by_hand()
    assert choose_units(profile, fixed=1000, budget=1180) == ()
    assert choose_units(profile, fixed=1000, budget=1179) == ("A",)
    assert choose_units(profile, fixed=1000, budget=1110) == ("A",)
    assert choose_units(profile, fixed=1000, budget=1109) == ("A", "B", "C")  # nothing fits: every unit
    assert choose_units(profile, fixed=0, budget=0) == ("A", "B", "C")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = random_components("tiny", seed=3).unet.requires_grad_(False)  # frozen, as the run has it
    network = build_network(unet, [], network_dim=4, network_alpha=2, train_text_encoder=False, lora=SDXL.lora)
    network.attach()
    for module in network.loras:  # a trained LoRA, so that every branch carries gradient from the first step
        torch.nn.init.normal_(module.lora_up.weight, std=0.05)
    return unet, network


def batch(unet, device="cpu", size=(64, 96), generator_seed=1):
    generator = torch.Generator().manual_seed(generator_seed)
    noisy = torch.randn(2, 4, size[1] // 8, size[0] // 8, generator=generator).to(device)
    context, pooled = SDXL.text_stand_in(unet, 2, 77)
    text = (torch.randn(context.shape, generator=generator).to(device),
            torch.randn(pooled.shape, generator=generator).to(device))
    sizes = torch.tensor([[96, 64, 0, 0, 96, 64]] * 2, dtype=torch.float32).to(device)
    return noisy, torch.tensor([10, 900], device=device), text, sizes


def test_the_meta_measurement_counts_what_a_real_forward_saves(tiny):
    unet, network = tiny
    noisy, timesteps, text, sizes = batch(unet)
    parameters = {p.untyped_storage().data_ptr() for module in (unet, network) for p in module.parameters()}
    real = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            real[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SDXL.predict(unet, noisy, timesteps, text, sizes)
    meta_unet = random_components("tiny", seed=3).unet.to("meta").requires_grad_(False)
    meta_network = build_network(meta_unet, [], network_dim=4, network_alpha=2, train_text_encoder=False,
                                 lora=SDXL.lora)
    meta_network.attach()
    meta = [tensor.to("meta") for tensor in (noisy, timesteps, *text, sizes)]
    profile = measure_activations(meta_unet, lambda: SDXL.predict(meta_unet, meta[0], meta[1], tuple(meta[2:4]),
                                                                   meta[4]), (meta_network,))
    assert len(profile.unit_names) == 18
    assert {segment.unit for segment in profile.segments} == set(profile.unit_names)
    assert profile.peak(set()) == sum(real.values())


def train_steps(unet, network, checkpointed: tuple[str, ...] | None, steps: int = 2) -> list[torch.Tensor]:
    """LoRA weights after `steps` AdamW steps from the same start, with these units checkpointed."""
    start = {name: value.clone() for name, value in network.state_dict().items()}
    if checkpointed is None:
        unet.disable_gradient_checkpointing()
    else:
        apply_plan(unet, checkpointed)
    unet.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    for step in range(steps):
        noisy, timesteps, text, sizes = batch(unet, generator_seed=step)
        prediction = SDXL.predict(unet, noisy, timesteps, text, sizes)
        torch.nn.functional.mse_loss(prediction, torch.zeros_like(prediction)).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = [p.detach().clone() for p in network.parameters()]
    network.load_state_dict(start)
    unet.disable_gradient_checkpointing()
    return trained


def test_every_plan_the_planner_can_make_trains_bit_identical_weights(tiny):
    """The planner's plans are the prefixes of the units by saving: none, the largest, the two largest, ... all."""
    unet, network = tiny
    meta_unet = random_components("tiny", seed=3).unet.to("meta")
    meta_network = build_network(meta_unet, [], network_dim=4, network_alpha=2, train_text_encoder=False,
                                 lora=SDXL.lora)
    meta_network.attach()
    noisy, timesteps, text, sizes = (t.to("meta") if isinstance(t, torch.Tensor) else tuple(x.to("meta") for x in t)
                                     for t in batch(unet))
    profile = measure_activations(meta_unet, lambda: SDXL.predict(meta_unet, noisy, timesteps, text, sizes),
                                  (meta_network,))
    order = sorted(profile.unit_names, key=profile.saving, reverse=True)
    reference = train_steps(unet, network, None)
    assert any(not torch.equal(a, b) for a, b in zip(reference, network.parameters()))  # the steps trained
    for count in range(len(order) + 1):
        trained = train_steps(unet, network, tuple(order[:count]))
        assert all(torch.equal(a, b) for a, b in zip(reference, trained)), f"plan of {count} units differs"


def test_a_plan_switches_exactly_its_units(tiny):
    unet, _ = tiny
    names = [name for name, _ in checkpoint_units(unet)]
    apply_plan(unet, (names[0], names[5]))
    assert [name for name, module in checkpoint_units(unet) if module.gradient_checkpointing] == [names[0], names[5]]
    unet.disable_gradient_checkpointing()


def sample(width: int, height: int, batch_size: int, caption: str, flip: bool = False) -> SimpleNamespace:
    return SimpleNamespace(bucket=(width, height), batch_size=batch_size,
                           record=SimpleNamespace(caption=caption, subset=SimpleNamespace(flip_aug=flip)))


def test_the_workload_is_the_batch_with_most_pixels_and_every_cached_latent():
    training = [sample(1024, 1024, 1, "a"), sample(768, 768, 2, "b", flip=True), sample(512, 512, 4, "a")]
    validation = [sample(2048, 2048, 4, "c")]  # no gradients, so no activations: only its caches count
    workload = Workload.of(training, training + validation)
    assert (workload.bucket, workload.batch_size) == ((768, 768), 2)  # 1.18 M pixels x 2 beats 1.05 M x 1
    assert workload.latent_elements == 4 * (128 * 128 + 2 * 96 * 96 + 64 * 64 + 256 * 256)
    assert workload.captions == 3


def test_the_estimate_counts_each_part_in_the_dtype_the_run_stores_it(tiny):
    unet, _ = tiny
    model = random_components("tiny", seed=3)
    model.unet.to("meta")
    network = build_network(model.unet, [], network_dim=4, network_alpha=2, train_text_encoder=False, lora=SDXL.lora)
    config = parse_train_args(["--pretrained_model_name_or_path", "m.safetensors", "--dataset_config", "d.toml",
                               "--mixed_precision", "bf16", "--cache_latents", "--cache_text_encoder_outputs",
                               "--network_train_unet_only", "--gradient_checkpointing", "--memory_budget_gb", "64"])
    workload = Workload(bucket=(128, 64), batch_size=2, latent_elements=1000, captions=3)
    estimate = estimate_memory(config, SDXL, model, network, workload, torch.device("cpu"), state_bytes_per_element=8)
    parts = dict(estimate.parts)
    lora = sum(p.numel() for p in network.parameters())
    assert parts["U-Net weights (16-bit)"] == 2 * sum(p.numel() for p in unet.parameters())
    assert parts["latent cache"] == 2 * 1000
    assert parts["text-encoder output cache"] == 3 * 2 * (77 * 128 + 64)  # 75 tokens + BOS/EOS, tiny widths
    assert parts["network weights"] == parts["network gradients"] == 4 * lora
    assert parts["optimizer state"] == 8 * lora
    assert not any(what.startswith(("VAE", "text encoder weights")) for what in parts)  # cached: released
    assert estimate.plan.checkpointed == () and estimate.total < 64 * 2**30
    activations = parts["U-Net activations (0 of 18 units checkpointed)"]
    assert activations == parts["CPU allocator reserve (about the unchecked activations)"] > 0
    assert estimate.plan.peak_without == estimate.total
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.unet.parameters())  # as they were
    assert all(p.dtype == torch.float32 for p in network.parameters()) and not network.loras[0].attached
    on_gpu = dict(model_parts(config, SDXL, model, workload, torch.device("cuda")))
    assert "latent cache" not in on_gpu and "text-encoder output cache" not in on_gpu  # the host holds them


def test_without_full_bf16_each_network_layer_saves_its_own_copy_of_its_input():
    """Autocast casts the float32 network's input for each of its layers, and each saves its copy."""
    def activations(*flags):
        model = random_components("tiny", seed=3)
        model.unet.to("meta").requires_grad_(False)
        network = build_network(model.unet, [], network_dim=4, network_alpha=2, train_text_encoder=False,
                                lora=SDXL.lora)
        config = parse_train_args(["--pretrained_model_name_or_path", "m", "--dataset_config", "d",
                                   "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only",
                                   "--mixed_precision", "bf16", *flags])
        estimate = estimate_memory(config, SDXL, model, network, Workload((64, 64), 1, 0, 0), torch.device("cpu"),
                                   8)
        return dict(estimate.parts)["U-Net activations (no checkpointing)"]

    assert activations() > activations("--full_bf16")


def test_the_meta_measurement_of_a_text_encoder_counts_what_a_real_forward_saves():
    encoder = random_components("tiny", seed=3).text_encoders[1]
    network = build_network(None, [encoder], network_dim=4, network_alpha=2, train_unet=False, lora=SDXL.lora)
    network.attach()
    tokens = torch.randint(0, 1000, (2, 77))
    parameters = {p.untyped_storage().data_ptr() for module in (encoder, network) for p in module.parameters()}
    real = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            real[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(tokens, output_hidden_states=True)
    encoder.to("meta")
    layers = [(name, module) for name, module in encoder.named_modules()
              if isinstance(module, GradientCheckpointingLayer)]
    profile = measure_layers(encoder, layers, lambda: encoder(tokens.to("meta"), output_hidden_states=True),
                             (network,))
    assert len(layers) == len(encoder.text_model.encoder.layers) == len(profile.segments)
    assert profile.peak(set()) == sum(real.values())
    everything = profile.peak({name for name, _ in layers})
    assert everything < profile.peak(set())
