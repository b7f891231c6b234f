"""SDXL's added conditioning: TE2's pooled vector plus sinusoidal embeddings of the image's original size,
crop offset and target size (the U-Net's `text_embeds` + `time_ids`, concatenated as sd-scripts feeds it), and
the U-Net call that passes them (`predict`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SIZE_EMBEDDING_DIM = 256

Pairs = Tensor | Sequence[Sequence[int]] | Sequence[int]


def _pairs(values: Pairs, name: str) -> Tensor:
    """(h, w) pairs as a float32 [B, 2] tensor; a single pair gives B = 1."""
    tensor = torch.as_tensor(values, dtype=torch.float32)
    if tensor.shape[-1] != 2 or tensor.dim() not in (1, 2):
        raise ValueError(f"{name} must be a pair or a [B, 2] batch of pairs, got shape {list(tensor.shape)}")
    return tensor.reshape(-1, 2)


def sinusoidal_embedding(values: Tensor, dim: int = SIZE_EMBEDDING_DIM) -> Tensor:
    """[N] scalars -> [N, dim]: [cos(x * f_k), sin(x * f_k)] with f_k = exp(-ln(10000) * k / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def size_condition(
    original_hw: Pairs, crop_top_left: Pairs, target_hw: Pairs, dim: int = SIZE_EMBEDDING_DIM
) -> Tensor:
    """[B, 6 * dim] float32: embeddings of original h, w, crop top, left, target h, w, in that order."""
    if dim % 2:
        raise ValueError(f"size embedding dim must be even, got {dim}")
    pairs = [_pairs(original_hw, "original_hw"), _pairs(crop_top_left, "crop_top_left"), _pairs(target_hw, "target_hw")]
    if len({p.shape[0] for p in pairs}) != 1:
        raise ValueError(f"original_hw, crop_top_left and target_hw batch sizes differ: {[p.shape[0] for p in pairs]}")
    values = torch.cat(pairs, dim=1)
    return sinusoidal_embedding(values.flatten(), dim).reshape(values.shape[0], 6 * dim)


def added_condition(pooled: Tensor, original_hw: Pairs, crop_top_left: Pairs, target_hw: Pairs) -> Tensor:
    """[B, pooled + 6 * 256] (2816 for SDXL): pooled TE2 output then the six size embeddings, in pooled's dtype."""
    sizes = size_condition(original_hw, crop_top_left, target_hw).to(pooled.device)
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=1)


def predict(unet: torch.nn.Module, noisy: Tensor, timesteps: Tensor, context: Tensor, pooled: Tensor,
            time_ids: Tensor) -> Tensor:
    """The SDXL U-Net's prediction (ε or v) with the added size/crop conditioning."""
    dtype = unet.dtype if unet.dtype.is_floating_point and unet.dtype.itemsize > 1 else noisy.dtype
    return unet(
        noisy.to(dtype), timesteps, context.to(dtype),
        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(noisy.device, dtype)},
    ).sample
