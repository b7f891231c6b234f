"""Optimizer factory: classes per name, --optimizer_args parsing, missing extras, Adafactor's rules."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train import optimizers as O


def _groups(lr_unet: float = 1e-4, lr_te: float = 1e-5) -> list[dict]:
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(64, 80))], "lr": lr_unet},
            {"params": [torch.nn.Parameter(torch.randn(16, 8))], "lr": lr_te}]


def _step(optimizer: torch.optim.Optimizer, steps: int = 1) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


@pytest.mark.parametrize("name, cls_path", [
    ("AdamW", "torch.optim.adamw.AdamW"),
    ("adamw", "torch.optim.adamw.AdamW"),
    ("", "torch.optim.adamw.AdamW"),
    ("SGDNesterov", "torch.optim.sgd.SGD"),
    ("Lion", "lion_pytorch.lion_pytorch.Lion"),
    ("Prodigy", "prodigyopt.prodigy.Prodigy"),
    ("DAdaptation", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"),
    ("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam"),
    ("DAdaptAdaGrad", "dadaptation.dadapt_adagrad.DAdaptAdaGrad"),
    ("DAdaptAdan", "dadaptation.dadapt_adan.DAdaptAdan"),
    ("DAdaptAdanIP", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP"),
    ("DAdaptLion", "dadaptation.dadapt_lion.DAdaptLion"),
    ("DAdaptSGD", "dadaptation.dadapt_sgd.DAdaptSGD"),
    ("Adafactor", "transformers.optimization.Adafactor"),
    ("AdamWScheduleFree", "schedulefree.adamw_schedulefree.AdamWScheduleFree"),
    ("RAdamScheduleFree", "schedulefree.radam_schedulefree.RAdamScheduleFree"),
    ("SGDScheduleFree", "schedulefree.sgd_schedulefree.SGDScheduleFree"),
    ("AdamW8bit", "bitsandbytes.optim.adamw.AdamW8bit"),
    ("SGDNesterov8bit", "bitsandbytes.optim.sgd.SGD8bit"),
    ("Lion8bit", "bitsandbytes.optim.lion.Lion8bit"),
    ("PagedAdamW8bit", "bitsandbytes.optim.adamw.PagedAdamW8bit"),
    ("PagedLion8bit", "bitsandbytes.optim.lion.PagedLion8bit"),
    ("PagedAdamW", "bitsandbytes.optim.adamw.PagedAdamW"),
    ("PagedAdamW32bit", "bitsandbytes.optim.adamw.PagedAdamW32bit"),
    ("RMSprop", "torch.optim.rmsprop.RMSprop"),
    ("torch.optim.Adagrad", "torch.optim.adagrad.Adagrad"),
    ("bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes.optim.ademamix.AdEMAMix8bit"),
])
def test_every_name_builds_its_class_and_steps(name, cls_path):
    adaptive = "dadapt" in name.lower() or name == "Prodigy"  # they expect lr ≈ 1
    built = O.build_optimizer(name, _groups(1.0, 1.0) if adaptive else _groups(), 1.0 if adaptive else 1e-4)
    cls = type(built.optimizer)
    assert f"{cls.__module__}.{cls.__name__}" == cls_path
    assert built.description.startswith(cls_path)
    before = built.optimizer.param_groups[0]["params"][0].detach().clone()
    _step(built.optimizer, 8)  # RAdam waits for its variance estimate before the first move
    assert not torch.equal(before, built.optimizer.param_groups[0]["params"][0])
    assert built.schedule_free == name.lower().endswith("schedulefree")


def test_adamw8bit_keeps_real_8bit_state_on_cpu():
    built = O.build_optimizer("AdamW8bit", _groups(), 1e-4)
    _step(built.optimizer)
    big = built.optimizer.param_groups[0]["params"][0]  # 5120 elements: above bitsandbytes' 4096 minimum
    state = built.optimizer.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_sgd_nesterov_defaults_momentum_and_records_description():
    built = O.build_optimizer("SGDNesterov", _groups(), 1e-3)
    group = built.optimizer.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.9
    assert built.description == "torch.optim.sgd.SGD(momentum=0.9)"
    plain = O.build_optimizer("AdamW", _groups(), 1e-3)
    assert plain.description == "torch.optim.adamw.AdamW"


def test_optimizer_args_parsing():
    kwargs = O.parse_kwargs(["betas=0.9,0.99", "weight_decay=0.1", "amsgrad=True", " name = 'x' ",
                             "formula='a=b+c'", "eps=1e-6", "rules=[1, 2]"], "--optimizer_args")
    assert kwargs == {"betas": (0.9, 0.99), "weight_decay": 0.1, "amsgrad": True, "name": "x",
                      "formula": "a=b+c", "eps": 1e-6, "rules": [1, 2]}
    with pytest.raises(LorakitError, match="--optimizer_args 'mode=fast'.*quote strings"):
        O.parse_kwargs(["mode=fast"], "--optimizer_args")
    with pytest.raises(LorakitError, match="expected key=value"):
        O.parse_kwargs(["betas"], "--optimizer_args")
    built = O.build_optimizer("AdamW", _groups(), 1e-3, ["betas=0.8,0.9", "weight_decay=0.05", "amsgrad=True"])
    group = built.optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.05 and group["amsgrad"] is True
    assert built.description == "torch.optim.adamw.AdamW(betas=(0.8, 0.9),weight_decay=0.05,amsgrad=True)"
    with pytest.raises(LorakitError, match="--optimizer_args for AdamW: .*bogus"):
        O.build_optimizer("AdamW", _groups(), 1e-3, ["bogus=1"])


def test_missing_extra_names_the_pip_extra(monkeypatch):
    real = importlib.import_module

    def without_prodigy(name, package=None):
        if name.split(".")[0] == "prodigyopt":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", without_prodigy)
    with pytest.raises(LorakitError, match=r"Prodigy needs the prodigyopt package: pip install 'lorakit\[prodigy\]'"):
        O.build_optimizer("Prodigy", _groups(), 1.0)


def test_unknown_names_are_one_line_errors():
    with pytest.raises(LorakitError, match="--optimizer_type Adamm: unknown optimizer"):
        O.build_optimizer("Adamm", _groups(), 1e-3)
    with pytest.raises(LorakitError, match="torch.optim has no Nope"):
        O.build_optimizer("torch.optim.Nope", _groups(), 1e-3)
    with pytest.raises(LorakitError, match="cannot import no_such_pkg"):
        O.build_optimizer("no_such_pkg.Opt", _groups(), 1e-3)


def test_adafactor_relative_step_rules(caplog):
    with caplog.at_level(logging.WARNING):
        built = O.build_optimizer("Adafactor", _groups(), 3e-4, lr_scheduler="cosine")
    assert built.lr is None and built.lr_scheduler == "adafactor:0.0003"
    assert all(group["lr"] is None for group in built.optimizer.param_groups)
    assert built.optimizer.defaults["relative_step"] is True
    assert built.description == "transformers.optimization.Adafactor(relative_step=True)"
    assert any("per-group learning rates" in w for w in built.warnings)
    assert any("replaced by adafactor:0.0003" in r.message for r in caplog.records)
    # The relative step size of the first update: min(1e-2, 1/√1) × RMS(p) with scale_parameter.
    p = built.optimizer.param_groups[0]["params"][0]
    rms = p.detach().pow(2).mean().sqrt().item()
    _step(built.optimizer)  # the RMS changes by at most 1e-2 × RMS × (update clipped to RMS 1)
    assert built.optimizer._get_lr(built.optimizer.param_groups[0], built.optimizer.state[p]) == pytest.approx(
        1e-2 * rms, rel=1e-5)


def test_adafactor_without_relative_step_keeps_lrs_and_warns():
    built = O.build_optimizer("Adafactor", _groups(), 3e-4, ["relative_step=False", "scale_parameter=False"],
                              lr_scheduler="cosine", max_grad_norm=1.0)
    assert built.lr_scheduler is None
    assert [g["lr"] for g in built.optimizer.param_groups] == [1e-4, 1e-5]
    assert len(built.warnings) == 2  # max_grad_norm, constant_with_warmup
    warm = O.build_optimizer("Adafactor", _groups(), 3e-4, ["relative_step=False", "warmup_init=True"])
    assert warm.lr_scheduler == "adafactor:0.0003"


def test_adaptive_optimizers_warn_about_low_and_several_lrs():
    built = O.build_optimizer("Prodigy", _groups(1e-4, 1e-5), 1e-4)
    assert len(built.warnings) == 2
    assert O.build_optimizer("DAdaptAdam", _groups(1.0, 1.0), 1.0).warnings == []


def test_schedule_free_train_eval_toggles_swap_weights():
    built = O.build_optimizer("AdamWScheduleFree", _groups(), 1e-2)
    for _ in range(3):
        _step(built.optimizer)
    p = built.optimizer.param_groups[0]["params"][0]
    train_weights = p.detach().clone()
    O.optimizer_eval_mode(built.optimizer)
    assert not torch.equal(train_weights, p)
    O.optimizer_train_mode(built.optimizer)
    torch.testing.assert_close(p.detach(), train_weights)
    O.optimizer_eval_mode(torch.optim.AdamW([p]))  # no-op for the others
