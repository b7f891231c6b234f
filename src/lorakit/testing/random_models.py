"""Models of a family's architecture (SDXL, SD 1.x, SD 2.x) with seeded random weights, written as real
checkpoints.

Tests, the demo and the benchmarks use these instead of downloading models: `tiny` loads and runs in well under a
second, `full` is the real base configuration. A single-file checkpoint is written in the original SGM/LDM layout
component by component, so a full-size file needs the memory of one part, not all of them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Sequence

import torch
from accelerate import init_empty_weights

from lorakit.fileio import atomic_path
from lorakit.families import family_named
from lorakit.models.components import Components, ModelIdentity, ModelPart

Size = Literal["tiny", "full"]

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

# The scheduler of stabilityai/stable-diffusion-xl-base-1.0 (sd-scripts' `train_network.py` trains on its DDPM
# betas).
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)


# ---------------------------------------------------------------- random weights


def random_tensor(shape: Sequence[int], name: str, seed: int) -> torch.Tensor:
    """A deterministic fp32 tensor for parameter `name`: independent of creation order and of other parameters.

    Matrices and kernels get std 1/sqrt(fan_in) (activations keep their scale), norm scales 1 + N(0, 0.02),
    biases N(0, 0.02).
    """
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    noise = torch.randn(tuple(shape), generator=generator)
    if len(shape) >= 2:
        return noise.mul_(1 / math.sqrt(math.prod(shape[1:])))
    if name.endswith("weight"):
        return noise.mul_(0.02).add_(1)
    return noise.mul_(0.02)


def random_network(part: ModelPart, config, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """Build `part` without initialising it, then fill every parameter from `random_tensor`, one at a time."""
    with init_empty_weights(include_buffers=False):
        module = part.build(config)
    parameters = dict(module.named_parameters())
    state = {name: random_tensor(p.shape, f"{part.attribute}.{name}", seed).to(dtype)
             for name, p in parameters.items()}
    module.load_state_dict(state, strict=False, assign=True)
    return module.eval()


def random_components(size: Size = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                      family: str = "sdxl") -> Components:
    """Every part of a `family` model with random weights, plus the offline tokenizers."""
    layout = family_named(family).layout
    modules = {part.attribute: random_network(part, part.config(size), seed, dtype)
               for part in layout.parts()}
    return layout.assemble(modules, layout.tokenizers(None),
                           ModelIdentity(name=f"random-{family}-{size}-seed{seed}", path=None), None)


# ---------------------------------------------------------------- single-file (SGM) checkpoints


@dataclass(frozen=True)
class SGMPart:
    """One part's tensors in a single-file checkpoint.

    `header()` may return meta tensors: only names, shapes and dtypes are read. `tensors()` is called once, when
    the part is written, and must give the same names and shapes; its result is dropped right after.
    """

    prefix: str
    header: Callable[[], Mapping[str, torch.Tensor]]
    tensors: Callable[[], Mapping[str, torch.Tensor]]


def write_safetensors_stream(parts: Sequence[SGMPart], path: str | os.PathLike, dtype: torch.dtype | None = None,
                             metadata: Mapping[str, str] | None = None) -> None:
    """Write a .safetensors file part by part: the header is built from shapes, then each part streams its bytes.

    safetensors' own `save_file` needs every tensor in memory at once; this needs one part. Floating tensors are
    cast to `dtype` when given.
    """
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    part_keys: list[list[str]] = []
    for part in parts:
        shapes = part.header()
        part_keys.append(list(shapes))
        entries += [(part.prefix + key, _stored_dtype(t.dtype, dtype), tuple(t.shape)) for key, t in shapes.items()]
    header = _safetensors_header(entries, metadata)
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for part, keys in zip(parts, part_keys):
            tensors = part.tensors()
            if list(tensors) != keys:
                raise ValueError(f"part {part.prefix!r} produced other tensors than its header announced")
            for key in keys:
                f.write(_raw_bytes(tensors[key], dtype))
            del tensors


def _stored_dtype(tensor_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and tensor_dtype.is_floating_point else tensor_dtype


def _safetensors_header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                        metadata: Mapping[str, str] | None) -> bytes:
    """JSON header with data offsets in entry order, space-padded to 8 bytes as safetensors itself does."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def _raw_bytes(tensor: torch.Tensor, dtype: torch.dtype | None) -> memoryview:
    tensor = tensor.detach().to("cpu", _stored_dtype(tensor.dtype, dtype)).contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _sgm_state(part: ModelPart, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return part.to_sgm(module.state_dict(), part.config_of(module))


def write_single_file(components: Components, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write loaded components as one single-file checkpoint (SDXL: the layout of sd_xl_base_1.0.safetensors)."""
    parts = []
    for part in components.parts():
        module = getattr(components, part.attribute)
        produce = lambda part=part, module=module: _sgm_state(part, module)  # noqa: E731
        parts.append(SGMPart(part.prefix, produce, produce))
    write_safetensors_stream(parts, path, dtype)


def write_random_single_file(path: str | os.PathLike, size: Size, seed: int, dtype: torch.dtype,
                             family: str = "sdxl") -> None:
    """Like `write_single_file(random_components(...))`, but each part exists only while it is written."""
    write_safetensors_stream(random_sgm_parts(size, seed, dtype, family), path, dtype)


def random_sgm_parts(size: Size, seed: int, dtype: torch.dtype, family: str = "sdxl") -> list[SGMPart]:
    """The networks as SGMParts whose header comes from the meta device and whose tensors are made on demand."""
    parts = []
    for part in family_named(family).layout.parts():
        config = part.config(size)

        def header(part=part, config=config):
            with init_empty_weights(include_buffers=True):
                return part.to_sgm(part.build(config).state_dict(), config)

        def tensors(part=part, config=config):
            return part.to_sgm(random_network(part, config, seed, dtype).state_dict(), config)

        parts.append(SGMPart(part.prefix, header, tensors))
    return parts


# ---------------------------------------------------------------- diffusers folders


def write_diffusers(components: Components, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write a diffusers folder that the family's pipeline (`StableDiffusionXLPipeline`,
    `StableDiffusionPipeline`) loads offline with `from_pretrained(folder)`."""
    def cast(module: torch.nn.Module) -> torch.nn.Module:
        return module if dtype is None else copy.deepcopy(module).to(dtype)

    modules = [(part, lambda m=getattr(components, part.attribute): cast(m)) for part in components.parts()]
    _write_diffusers_folder(folder, modules, components.tokenizers)


def write_random_diffusers(folder: str | os.PathLike, size: Size, seed: int, dtype: torch.dtype,
                           family: str = "sdxl") -> None:
    """Like `write_diffusers(random_components(...))`, one part in memory at a time."""
    layout = family_named(family).layout
    modules = [(part, lambda n=part: random_network(n, n.config(size), seed, dtype))
               for part in layout.parts()]
    _write_diffusers_folder(folder, modules, layout.tokenizers(None))


def _write_diffusers_folder(folder: str | os.PathLike, modules: list[tuple[ModelPart, Callable[[], torch.nn.Module]]],
                            tokenizers: Sequence) -> None:
    from diffusers import EulerDiscreteScheduler, __version__

    tokenizer_folders = ["tokenizer", "tokenizer_2"][:len(tokenizers)]
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        for part, produce in modules:
            produce().save_pretrained(temporary / part.subfolder, safe_serialization=True)
        for tokenizer, subfolder in zip(tokenizers, tokenizer_folders):
            tokenizer.save_pretrained(temporary / subfolder)
        EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(temporary / "scheduler")
        index = _model_index(__version__, [part for part, _ in modules], tokenizer_folders)
        (temporary / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _model_index(diffusers_version: str, parts: Sequence[ModelPart], tokenizer_folders: Sequence[str]) -> dict:
    sdxl = "tokenizer_2" in tokenizer_folders
    index = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    index |= {"force_zeros_for_empty_prompt": True} if sdxl else {"safety_checker": [None, None],
                                                                   "requires_safety_checker": False}
    index |= {folder: ["transformers", "CLIPTokenizer"] for folder in tokenizer_folders}
    index |= {part.subfolder: ["diffusers" if part.is_diffusers else "transformers",
                                  part.model_class.__name__] for part in parts}
    return dict(sorted(index.items()))

