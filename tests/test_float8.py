"""Float8 weight storage (--fp8_base): outputs and input gradients equal the same layers computed with the
float8-rounded weights in the compute dtype, on this CPU and on an emulated AVX2-only one (where the convolution
backward kernels keep the weight they were given)."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lorakit.models.float8 import STORAGE_DTYPE, store_in_float8

LAYERS = {
    "linear": (lambda: nn.Linear(24, 16), (2, 5, 24)),
    "conv3x3_stride2": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 9, 7)),
    "conv1x1_no_bias": (lambda: nn.Conv2d(8, 4, 1, bias=False), (1, 8, 5, 5)),
}


def compare(layer_name: str, compute_dtype: torch.dtype) -> tuple[float, float]:
    """Max |difference| of the output and of the input gradient between float8 storage and the reference."""
    torch.manual_seed(0)
    make, shape = LAYERS[layer_name]
    layer = nn.Sequential(make().to(compute_dtype)).requires_grad_(False)
    reference = copy.deepcopy(layer)
    reference[0].weight.data = reference[0].weight.data.to(STORAGE_DTYPE).to(compute_dtype)
    assert store_in_float8(layer, compute_dtype) == 1
    assert layer[0].weight.dtype == STORAGE_DTYPE
    x = torch.randn(shape, dtype=compute_dtype)
    results = []
    for model in (layer, reference):
        inputs = x.clone().requires_grad_()
        output = model(inputs)
        output.backward(torch.linspace(-1, 1, output.numel()).reshape(output.shape).to(compute_dtype))
        results.append((output.detach(), inputs.grad))
    assert layer[0].weight.dtype == STORAGE_DTYPE  # still float8 after the call
    (output, grad), (expected_output, expected_grad) = results
    return (output - expected_output).abs().max().item(), (grad - expected_grad).abs().max().item()


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_float32_compute_is_exact(layer_name):
    assert compare(layer_name, torch.float32) == (0.0, 0.0)


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_bfloat16_compute_matches_reference(layer_name):
    output_error, grad_error = compare(layer_name, torch.bfloat16)
    assert output_error <= 1e-2 and grad_error <= 1e-2


def test_bfloat16_backward_on_an_avx2_only_cpu():
    """ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA make this CPU take the kernels of a CPU without AVX-512."""
    code = ("import torch, tests.test_float8 as t\n"
            "print(torch.backends.cpu.get_cpu_capability())\n"
            "for name in sorted(t.LAYERS): print(name, *t.compare(name, torch.bfloat16))")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "AVX2"
    for line in lines[1:len(LAYERS) + 1]:
        _, output_error, grad_error = line.split()
        assert float(output_error) <= 1e-2 and float(grad_error) <= 1e-2, line


def test_frozen_weights_only():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="frozen"):
        store_in_float8(layer, torch.bfloat16)
