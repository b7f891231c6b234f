"""`lorakit inspect FILE [--json]`: what a LoRA file holds (modules per part, ranks, alphas, dtypes, conv layers,
metadata), or which architecture a checkpoint is. Reads the header and the small alpha tensors only."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Mapping

from safetensors import safe_open

from lorakit.errors import LorakitError

METADATA_SUMMARY_KEYS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_sd_model_name", "ss_output_name", "ss_epoch", "ss_steps", "ss_num_train_images", "ss_learning_rate",
    "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_mixed_precision", "ss_seed",
    "ss_training_started_at", "ss_training_finished_at", "modelspec.architecture", "modelspec.title",
    "modelspec.resolution", "modelspec.implementation_version", "sshs_model_hash", "sshs_legacy_hash",
)
# The tensor that marks a module of each kind (LyCORIS' kohya format); a DoRA is a LoRA with a dora_scale.
MODULE_KEYS = {"lora_down.weight": "lora", "hada_w1_b": "loha", "lokr_w1": "lokr"}
TYPE_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
PART_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a LoRA file or a model checkpoint (.safetensors, .ckpt, .pt)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    summary = inspect_file(args.file)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def inspect_file(path: str) -> dict:
    shapes, dtypes, metadata, alphas = _read_header(Path(path))
    if any(".lora_down." in key or key.startswith("lora_") for key in shapes):
        return summarize_lora(shapes, dtypes, alphas, metadata) | {"file": str(path)}
    return summarize_checkpoint(shapes, dtypes) | {"file": str(path)}


def summarize_lora(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], alphas: Mapping[str, float],
                   metadata: Mapping[str, str]) -> dict:
    """Counts of a LoRA file in the sd-scripts format; pure, from names, shapes, dtypes and alpha values."""
    modules, ranks, conv, types = Counter(), Counter(), Counter(), Counter()
    diffusers_style = False
    for key, shape in shapes.items():
        name, _, rest = key.partition(".")
        if rest not in MODULE_KEYS:
            continue
        kind = MODULE_KEYS[rest]
        if kind == "lora" and f"{name}.dora_scale" in shapes:
            kind = "dora"
        part = next((p for prefix, p in PART_PREFIXES if name.startswith(prefix)), "other")
        modules[part] += 1
        types[kind] += 1
        if kind == "lokr":
            factored = shapes.get(f"{name}.lokr_w2_a")
            ranks[factored[1] if factored else "full"] += 1
            kernel = shapes.get(f"{name}.lokr_w2", ())[2:]
        else:
            ranks[shape[0]] += 1
            kernel = shape[2:] if kind != "loha" else ()
        if len(kernel) == 2:
            conv[f"{kernel[0]}x{kernel[1]}"] += 1
        diffusers_style |= name.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))
    return {
        "kind": "lora",
        "types": dict(sorted(types.items())),
        "tensors": len(shapes),
        "modules": dict(sorted(modules.items())),
        "ranks": {str(rank): count for rank, count in sorted(ranks.items(), key=lambda item: str(item[0]).zfill(9))},
        "alphas": {_number(alpha): count for alpha, count in sorted(Counter(alphas.values()).items())},
        "dtypes": dict(sorted(Counter(dtypes.values()).items())),
        "conv_layers": dict(sorted(conv.items())),
        "unet_names": "diffusers-style" if diffusers_style else "sgm",
        "metadata_keys": len(metadata),
        "metadata": {key: _shorten(metadata[key]) for key in METADATA_SUMMARY_KEYS if key in metadata},
    }


def summarize_checkpoint(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> dict:
    from lorakit.models.detect import checkpoint_kind

    kind = checkpoint_kind(shapes)
    summary = {"kind": "checkpoint", "architecture": kind.name, "evidence": kind.evidence, "tensors": len(shapes),
               "parameters": sum(math.prod(shape) for shape in shapes.values()),
               "dtypes": dict(sorted(Counter(dtypes.values()).items()))}
    if kind.is_sdxl:
        from lorakit.models.prefixes import UNET_PREFIX
        from lorakit.models.unet import unet_config_from_sgm

        unet = {k[len(UNET_PREFIX):]: s for k, s in shapes.items() if k.startswith(UNET_PREFIX)}
        config = unet_config_from_sgm(unet)
        summary["unet"] = {"block_out_channels": list(config["block_out_channels"]),
                           "transformer_layers_per_block": list(config["transformer_layers_per_block"]),
                           "cross_attention_dim": config["cross_attention_dim"],
                           "parameters": sum(math.prod(shape) for shape in unet.values())}
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['file']}: {summary['kind']}, {summary['tensors']} tensors"]
    if summary["kind"] == "lora":
        lines.append("modules: " + ", ".join(f"{part} {n}" for part, n in summary["modules"].items())
                     + "; types: " + _counts({TYPE_NAMES[kind]: n for kind, n in summary["types"].items()}))
        lines.append("ranks: " + _counts(summary["ranks"]) + "; alphas: " + _counts(summary["alphas"]))
        lines.append("dtypes: " + _counts(summary["dtypes"]))
        conv = summary["conv_layers"]
        lines.append("conv layers: " + (_counts(conv) if conv else "none") + f"; U-Net names: {summary['unet_names']}")
        lines.append(f"metadata: {summary['metadata_keys']} keys")
        lines += [f"  {key} = {value}" for key, value in summary["metadata"].items()]
    else:
        lines.append(f"architecture: {summary['architecture']} ({summary['evidence']})")
        lines.append(f"parameters: {summary['parameters']:,}; dtypes: {_counts(summary['dtypes'])}")
        if "unet" in summary:
            unet = summary["unet"]
            lines.append(f"U-Net: {unet['parameters']:,} parameters, channels {unet['block_out_channels']}, "
                         f"transformer depth {unet['transformer_layers_per_block']}, "
                         f"cross-attention {unet['cross_attention_dim']}")
    return "\n".join(lines)


def _read_header(path: Path) -> tuple[dict, dict, dict, dict]:
    if not path.is_file():
        raise LorakitError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
                dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
                alphas = {key: float(f.get_tensor(key)) for key in f.keys() if key.endswith(".alpha")}
                return shapes, dtypes, dict(f.metadata() or {}), alphas
        except Exception as error:
            raise LorakitError(f"{path}: not a readable safetensors file ({error})") from None
    from lorakit.models.loading import load_torch_tensors

    tensors = load_torch_tensors(str(path))
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    dtypes = {key: str(value.dtype).removeprefix("torch.") for key, value in tensors.items()}
    return shapes, dtypes, {}, {key: float(value) for key, value in tensors.items() if key.endswith(".alpha")}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{key} x{n}" for key, n in counts.items())


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
