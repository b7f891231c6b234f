"""Frozen Linear and Conv2d weights stored as float8_e4m3fn and computed in the mixed-precision dtype
(`--fp8_base`, `--fp8_base_unet`).

A layer's forward casts its float8 weight to the compute dtype for that call; its backward casts it again for the
input gradient instead of keeping the cast copy, so the float8 tensor is the only copy of a weight that outlives a
call. (diffusers' `apply_layerwise_casting` swaps `weight.data` back to float8 after the forward instead; a
convolution that saved the weight for its backward then finds float8 data there, and CPUs without native bf16
fail with "expected scalar type BFloat16 but found Float8_e4m3fn".)
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional

STORAGE_DTYPE = torch.float8_e4m3fn


class _Float8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.compute_dtype, ctx.input_dtype = compute_dtype, x.dtype
        return functional.linear(x.to(compute_dtype), weight.to(compute_dtype),
                                 None if bias is None else bias.to(compute_dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        grad_input = grad.to(ctx.compute_dtype) @ weight.to(ctx.compute_dtype)
        return grad_input.to(ctx.input_dtype), None, None, None


class _Float8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype, stride, padding,
                dilation, groups: int) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.compute_dtype, ctx.input_dtype, ctx.input_shape = compute_dtype, x.dtype, x.shape
        ctx.geometry = (stride, padding, dilation, groups)
        return functional.conv2d(x.to(compute_dtype), weight.to(compute_dtype),
                                 None if bias is None else bias.to(compute_dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        nothing = (None,) * 7
        if not ctx.needs_input_grad[0]:
            return (None, *nothing)
        (weight,) = ctx.saved_tensors
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight.to(ctx.compute_dtype),
                                                grad.to(ctx.compute_dtype), *ctx.geometry)
        return (grad_input.to(ctx.input_dtype), *nothing)


def _linear_forward(layer: nn.Linear, compute_dtype: torch.dtype):
    def forward(x: Tensor) -> Tensor:
        return _Float8Linear.apply(x, layer.weight, layer.bias, compute_dtype)
    return forward


def _conv_forward(layer: nn.Conv2d, compute_dtype: torch.dtype):
    def forward(x: Tensor) -> Tensor:
        return _Float8Conv2d.apply(x, layer.weight, layer.bias, compute_dtype, layer.stride, layer.padding,
                                   layer.dilation, layer.groups)
    return forward


def store_in_float8(model: nn.Module, compute_dtype: torch.dtype, skip: Sequence[str] = ()) -> int:
    """Store the frozen weights of `model`'s Linear and Conv2d layers as float8_e4m3fn, computed in
    `compute_dtype`; layers whose qualified name matches a regular expression of `skip` keep their dtype, and so
    do biases (small). Returns the number of layers converted."""
    patterns = [re.compile(pattern) for pattern in skip]
    converted = 0
    for name, layer in model.named_modules():
        if any(pattern.search(name) for pattern in patterns):
            continue
        if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            make_forward = _conv_forward
        elif isinstance(layer, nn.Linear):
            make_forward = _linear_forward
        else:
            continue
        if layer.weight.requires_grad:
            raise ValueError(f"{name}: float8 storage is for frozen weights; this one requires grad")
        layer.weight = nn.Parameter(layer.weight.detach().to(STORAGE_DTYPE), requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach().to(compute_dtype), requires_grad=False)
        layer.forward = make_forward(layer, compute_dtype)
        converted += 1
    return converted
