"""Load SDXL from what users have: an SGM single file (.safetensors, .ckpt), a diffusers folder or a hub id.

A single file is read tensor by tensor straight into the target dtype; every network is built on the meta device
first and takes the converted tensors as its parameters, so the model never exists twice (nor in fp32 first). The
architecture comes from the tensor shapes, so tiny test models and the real SDXL load alike.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import torch
from accelerate import init_empty_weights

from lorakit.errors import LorakitError
from lorakit.fileio import parse_json, read_text
from lorakit.models.components import (Components, ModelIdentity, ModelPart, SDXLComponents, cast_model,
                                       sdxl_parts)
from lorakit.models.detect import VAE_PREFIX, checkpoint_kind, require_sdxl, vae_prefix
from lorakit.models.tokenizers import cached_tokenizers, load_tokenizers

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

Reader = Callable[[str, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class ModelLayout:
    """How a family's models are stored and put together: what `load_model` needs to know of them."""

    title: str  # "SDXL", in messages
    parts: Callable[[], tuple[ModelPart, ...]]  # the networks, in checkpoint order
    assemble: Callable[..., Components]  # (modules by attribute, tokenizers, identity, vae_identity) -> components
    tokenizers: Callable[[str | os.PathLike | None], tuple]  # offline tokenizers (or those of --tokenizer_cache_dir)
    check: Callable[[Mapping[str, Sequence[int]], str], None]  # refuse a single file of another kind of model
    folder_check: Callable[[dict, str], None]  # refuse a diffusers folder of another kind (its model_index.json)
    example: str  # a hub id, in messages


def _sdxl_tokenizers(cache_dir: str | os.PathLike | None) -> tuple:
    return cached_tokenizers(cache_dir) if cache_dir else load_tokenizers()


def _sdxl_components(modules: dict, tokenizers: tuple, identity: ModelIdentity,
                     vae_identity: ModelIdentity | None) -> SDXLComponents:
    return SDXLComponents(**modules, tokenizer1=tokenizers[0], tokenizer2=tokenizers[1], identity=identity,
                          vae_identity=vae_identity)


def _sdxl_folder(index: dict, folder: str) -> None:
    if "text_encoder_2" not in index:
        raise LorakitError(f"{folder} does not look like an SDXL model: its model_index.json names "
                           f"{index.get('_class_name', '?')} without text_encoder_2")


SDXL_LAYOUT = ModelLayout("SDXL", sdxl_parts, _sdxl_components, _sdxl_tokenizers, require_sdxl, _sdxl_folder,
                          "stabilityai/stable-diffusion-xl-base-1.0")


def load_sdxl(path: str | os.PathLike, *, vae: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", tokenizer_cache_dir: str | os.PathLike | None = None,
              skip: Collection[str] = ()) -> SDXLComponents:
    """Load SDXL base (U-Net, VAE, both text encoders) in `dtype`, with offline tokenizers (`load_model`)."""
    return load_model(SDXL_LAYOUT, path, vae=vae, dtype=dtype, device=device,
                      tokenizer_cache_dir=tokenizer_cache_dir, skip=skip)


def load_model(layout: ModelLayout, path: str | os.PathLike, *, vae: str | os.PathLike | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               tokenizer_cache_dir: str | os.PathLike | None = None, skip: Collection[str] = ()) -> Components:
    """Load a model of `layout`'s family in `dtype`, with offline tokenizers.

    `path`: a single-file checkpoint (original SGM/LDM layout), a diffusers folder (with model_index.json) or a hub
    id (`org/name`, from the hub or its local cache). `vae`: a replacement VAE — a diffusers folder, a VAE-only
    single file, or a full checkpoint whose VAE is taken. `skip`: networks not to load now (their slots stay
    None), e.g. `{"unet"}`.

    On the `meta` device no weight is read: the networks are built from the checkpoint's tensor names and shapes
    (single files) or configs (folders), with every check a real load makes on them (the dry run's rehearsal).
    """
    source = os.fspath(path)
    meta = torch.device(device).type == "meta"
    if vae is not None and not os.path.exists(vae):  # before minutes of loading the main model
        raise LorakitError(f"--vae {os.fspath(vae)}: no such file or folder; expected a VAE .safetensors file or a "
                           "diffusers VAE folder")
    parts = layout.parts()
    wanted = [n for n in parts if n.attribute not in skip and (vae is None or n.attribute != "vae")]
    if os.path.isdir(source):
        modules = _load_diffusers(source, wanted, dtype, local_only=True, meta=meta, layout=layout)
    elif os.path.isfile(source):
        modules = _load_single_file(source, wanted, dtype, meta=meta, check=layout.check)
    elif is_hub_id(source):  # the meta rehearsal never downloads: a hub id must be in the local cache for it
        modules = _load_diffusers(source, wanted, dtype, local_only=meta, meta=meta, layout=layout)
    else:
        raise LorakitError(f"{source}: no such file or folder; expected an {layout.title} checkpoint (.safetensors or "
                           f".ckpt), a diffusers folder or a hub id like {layout.example}")
    vae_identity = None
    if vae is not None and "vae" not in skip:
        modules["vae"] = load_vae(vae, dtype, meta=meta, part=next(n for n in parts if n.attribute == "vae"))
        vae_identity = ModelIdentity.of(vae)
    loaded = {name: module.to(device).eval() for name, module in modules.items()}
    return layout.assemble({n.attribute: None for n in parts} | loaded, layout.tokenizers(tokenizer_cache_dir),
                           ModelIdentity.of(source), vae_identity)


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, meta: bool = False,
             part: ModelPart | None = None) -> torch.nn.Module:
    """An `AutoencoderKL` from a diffusers folder (a VAE's or a pipeline's), a VAE-only file or a full checkpoint
    (on the meta device with `meta`, as in `load_model`). `part`: the family's VAE part (SDXL's by default)."""
    source = os.fspath(path)
    part = part or next(n for n in sdxl_parts() if n.attribute == "vae")
    if os.path.isdir(source):
        subfolder = part.subfolder if os.path.isfile(os.path.join(source, "model_index.json")) else None
        return _from_pretrained(part, source, subfolder, dtype, local_only=True, meta=meta)
    with CheckpointFile(source, meta=meta) as (shapes, read):
        prefix = vae_prefix(shapes)
        if prefix is None and any(key.startswith(VAE_PREFIX) for key in shapes):
            prefix = VAE_PREFIX
        if prefix is None:
            kind = checkpoint_kind(shapes)
            raise LorakitError(f"--vae {source} holds no VAE: it looks like {kind.name} ({kind.evidence}); expected "
                               f"encoder.*/decoder.* keys, with or without {VAE_PREFIX}")
        return _build(part, shapes, read, prefix, dtype, source)


# ---------------------------------------------------------------- single files


def _load_single_file(source: str, parts: Iterable[ModelPart], dtype: torch.dtype, meta: bool = False,
                      check: Callable[[Mapping[str, Sequence[int]], str], None] = require_sdxl,
                      ) -> dict[str, torch.nn.Module]:
    with CheckpointFile(source, meta=meta) as (shapes, read):
        check(shapes, source)
        modules = {}
        for part in parts:
            if not any(key.startswith(part.prefix) for key in shapes):
                hint = "pass a VAE with --vae" if part.attribute == "vae" else "the file is incomplete"
                raise LorakitError(f"{source} has no {part.prefix}* tensors ({part.attribute}); {hint}")
            modules[part.attribute] = _build(part, shapes, read, part.prefix, dtype, source)
        return modules


def _build(part: ModelPart, shapes: Mapping[str, tuple[int, ...]], read: Reader, prefix: str, dtype: torch.dtype,
           source: str) -> torch.nn.Module:
    """Build `part` on the meta device and give it the converted tensors under `prefix` as its parameters."""
    own_shapes = {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    try:
        config = part.config_from_sgm(own_shapes)
        with init_empty_weights(include_buffers=False):  # buffers (CLIP's position ids) are small and not stored
            module = part.build(config)
        state = part.to_diffusers(LazyTensors(read, own_shapes, prefix, dtype), config)
    except LorakitError as error:
        raise LorakitError(f"{source}: {part.attribute}: {error}") from None
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as error:  # shapes no SDXL network has
        raise LorakitError(f"{source}: {part.attribute}: its tensor shapes do not make an SDXL "
                           f"{part.attribute} ({type(error).__name__}: {_first_line(error)})") from None
    expected = module.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise LorakitError(f"{source}: {part.attribute} tensor {key} has shape {tuple(tensor.shape)}; the "
                               f"architecture the other tensors give expects {tuple(expected[key].shape)}")
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise LorakitError(f"{source}: {part.attribute} does not match its inferred architecture: "
                           f"{len(missing)} missing tensor(s) (e.g. {', '.join(missing[:3]) or '-'}), "
                           f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'})")
    return module


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors under `prefix`, keyed without it; each is read from the file and cast only when asked for."""

    def __init__(self, read: Reader, shapes: Mapping[str, tuple[int, ...]], prefix: str, dtype: torch.dtype):
        self._read, self._keys, self._prefix, self._dtype = read, dict.fromkeys(shapes), prefix, dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._read(self._prefix + key, self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys


class CheckpointFile:
    """An open single file: entering yields (shape of every tensor, reader); leaving releases the file mapping.
    With `meta` the reader gives empty meta tensors of the right shapes and reads nothing."""

    def __init__(self, source: str, meta: bool = False):
        self.source, self.meta = source, meta

    def __enter__(self) -> tuple[dict[str, tuple[int, ...]], Reader]:
        if self.source.lower().endswith(PICKLE_SUFFIXES):
            self._state = load_torch_tensors(self.source)
            shapes = {key: tuple(tensor.shape) for key, tensor in self._state.items()}
            read = self._read_pickled
        else:
            self._file = _safe_open(self.source)
            try:
                shapes = {key: tuple(self._file.get_slice(key).get_shape()) for key in self._file.keys()}
            except Exception as error:
                self._file.__exit__(None, None, None)
                raise LorakitError(f"{self.source}: unreadable .safetensors header ({_first_line(error)})") from error
            read = self._read_safetensors
        if self.meta:
            return shapes, lambda key, dtype: torch.empty(shapes[key], dtype=dtype, device="meta")
        return shapes, read

    def _read_pickled(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        return _cast(self._state[key], dtype, copy=True)

    def _read_safetensors(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        try:
            tensor = self._file.get_tensor(key)
        except Exception as error:
            raise LorakitError(f"{self.source}: cannot read tensor {key} ({_first_line(error)}); "
                               "the file may be truncated") from error
        return _cast(tensor, dtype, copy=False)

    def __exit__(self, *exc) -> None:
        if hasattr(self, "_file"):
            self._file.__exit__(*exc)
            del self._file
        self.__dict__.pop("_state", None)


def _cast(tensor: torch.Tensor, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """Floating tensors to `dtype`; `copy` when the source memory belongs to a mapping that will be closed."""
    return tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=copy)


def _safe_open(source: str):
    from safetensors import SafetensorError, safe_open

    size = os.path.getsize(source)
    try:
        # pread, not mmap: every mapped page that is read counts in RSS until the mapping closes (peak RSS twice the
        # model when converting fp16 -> bf16), and tensors read through mmap keep the file mapped after loading.
        handle = safe_open(source, framework="pt", device="cpu", backend="pread")
        handle.__enter__()
    except SafetensorError as error:
        raise LorakitError(f"{source}: not a complete .safetensors file ({_first_line(error)}, {size} bytes); "
                           "is it truncated or still downloading?") from error
    return handle


def load_torch_tensors(source: str) -> dict[str, torch.Tensor]:
    """The tensors of a `.ckpt`/`.pt`/`.bin` (a state dict, or one under "state_dict"): `torch.load` with
    weights_only=True (never arbitrary pickles), memory-mapped when the format allows."""
    try:
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # the pre-1.6 (non-zip) format cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            loaded = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise LorakitError(f"{source} holds pickled objects other than tensors; refusing to unpickle it "
                           "(convert it to .safetensors)") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise LorakitError(f"{source}: not a readable PyTorch checkpoint ({_first_line(error)})") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise LorakitError(f"{source} holds a {type(loaded).__name__}; expected a dict of tensors (a state dict)")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


# ---------------------------------------------------------------- diffusers folders and hub ids


def _load_diffusers(source: str, parts: Iterable[ModelPart], dtype: torch.dtype, local_only: bool,
                    meta: bool = False, layout: ModelLayout | None = None) -> dict[str, torch.nn.Module]:
    if local_only:
        _check_diffusers_folder(source, layout or SDXL_LAYOUT)
    return {n.attribute: _from_pretrained(n, source, n.subfolder, dtype, local_only, meta) for n in parts}


def _check_diffusers_folder(folder: str, layout: ModelLayout) -> None:
    index_path = Path(folder, "model_index.json")
    subfolders = ", ".join(f"{part.subfolder}/" for part in layout.parts())
    if not index_path.is_file():
        raise LorakitError(f"{folder} is a folder without model_index.json; expected a diffusers {layout.title} "
                           f"folder (model_index.json, {subfolders}) or a checkpoint file")
    index = parse_json(read_text(index_path, "diffusers folder index"), index_path, "diffusers folder index")
    if not isinstance(index, dict):
        raise LorakitError(f"{index_path}: expected a JSON object naming the pipeline's components, found "
                           f"{type(index).__name__}")
    layout.folder_check(index, folder)


def _from_pretrained(part: ModelPart, source: str, subfolder: str | None, dtype: torch.dtype,
                     local_only: bool, meta: bool = False) -> torch.nn.Module:
    dtype_argument = "torch_dtype" if part.is_diffusers else "dtype"
    where = f"{source}/{subfolder}" if subfolder else source
    try:
        if meta:
            module = cast_model(_from_config_on_meta(part, source, subfolder, local_only), dtype)
            if os.path.isdir(source):
                _check_folder_weights(module, Path(source, subfolder or ""))
            return module
        return part.model_class.from_pretrained(source, subfolder=subfolder, local_files_only=local_only,
                                                    **{dtype_argument: dtype})
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        hint = "" if local_only else " (not in the local Hugging Face cache and the hub is unreachable?)"
        raise LorakitError(f"cannot load {part.model_class.__name__} from {where}{hint}: "
                           f"{_first_line(error)}") from error


# The weight files from_pretrained reads without a variant: diffusers', then transformers' names.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")


def _check_folder_weights(module: torch.nn.Module, folder: Path) -> None:
    """The weights a component folder holds fit the model its config describes: every tensor of the model is
    there with its shape (read from the files' headers; transformers' `text_model.` prefix either way)."""
    found = _folder_weight_shapes(folder)

    def plain(key: str) -> str:
        return key.removeprefix("text_model.")

    found = {plain(key): shape for key, shape in found.items()}
    for key, tensor in module.state_dict().items():
        shape = found.get(plain(key))
        if shape is None:
            raise LorakitError(f"{folder}: its weights have no tensor {key}, which its config.json's model has")
        if tuple(shape) != tuple(tensor.shape):
            raise LorakitError(f"{folder}: tensor {key} has shape {tuple(shape)}; its config.json's model expects "
                               f"{tuple(tensor.shape)}")


def _folder_weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if name.endswith(".safetensors") and index.is_file():
            data = parse_json(read_text(index, "weights index"), index, "weights index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise LorakitError(f"{index}: expected an object with a \"weight_map\" of tensor names to files")
            shapes = {}
            for part in sorted(set(weight_map.values())):
                with CheckpointFile(str(folder / part), meta=True) as (part_shapes, _):
                    shapes |= part_shapes
            return shapes
        if (folder / name).is_file():
            with CheckpointFile(str(folder / name), meta=True) as (shapes, _):
                return shapes
    raise LorakitError(f"{folder}: no weights file ({', '.join(WEIGHT_FILES)}, or a sharded .index.json)")


def _from_config_on_meta(part: ModelPart, source: str, subfolder: str | None, local_only: bool) -> torch.nn.Module:
    """The model a folder's config.json describes, built on the meta device (no weights read)."""
    if part.is_diffusers:
        config = part.model_class.load_config(source, subfolder=subfolder, local_files_only=local_only)
        with init_empty_weights():
            return part.model_class.from_config(config)
    config = part.model_class.config_class.from_pretrained(source, subfolder=subfolder,
                                                              local_files_only=local_only)
    with init_empty_weights():
        return part.model_class(config)


def check_hub_model(repo_id: str) -> None:
    """A hub id that is not in the local cache: raise one line unless the hub can be asked and has the model
    (what loading it would then download)."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    what = f"{repo_id} is not a local file or folder, nor a model in the local Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise LorakitError(f"{what}, and HF_HUB_OFFLINE forbids downloading it")
    try:
        model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise LorakitError(f"{what}, and the hub has no such model (a mistyped path?)") from None
    except Exception as error:  # noqa: BLE001 - any network failure: the model cannot be had
        raise LorakitError(f"{what}, and the hub cannot be reached to download it ({_first_line(error)})") from None


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and not source.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
