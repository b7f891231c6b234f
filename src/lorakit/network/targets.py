"""Which layers of the SDXL models get LoRA, and their sd-scripts names (`networks/lora.py`'s
`LoRANetwork.create_modules` and `create_network`).

Names follow sd-scripts' SGM layout (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) although
the models are diffusers / transformers ones: the diffusers module path is translated through
`lorakit.models.unet.unet_module_paths`. Block indices (0..22) are those of sd-scripts' `get_block_index`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping, Sequence

from torch import Tensor, nn

UNET_PREFIX = "lora_unet"
TE_PREFIXES = ("lora_te1", "lora_te2")

# Container classes whose Linear / Conv2d descendants get LoRA (sd-scripts' *_TARGET_REPLACE_MODULE).
UNET_CONTAINERS = ("Transformer2DModel",)
UNET_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")

NUM_BLOCKS = 23  # 0 = time/label embedding, 1-9 input_blocks, 10-12 middle_block, 13-21 output_blocks, 22 = out

Kind = Literal["linear", "conv1x1", "conv3x3"]
Part = Literal["unet", "te", "te1", "te2"]  # "te": the one text encoder of SD 1.x/2.x


@dataclass(frozen=True)
class Target:
    """One layer that can carry a LoRA module."""

    lora_name: str
    module: nn.Module
    part: Part
    kind: Kind
    block: int  # sd-scripts block index for U-Net layers, -1 for text-encoder layers

    @property
    def uses_conv_rank(self) -> bool:
        """3x3 convs take `conv_dim`; Linear and 1x1 convs take `network_dim` (sd-scripts' rule)."""
        return self.kind == "conv3x3"


def layer_kind(module: nn.Module) -> Kind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if module.kernel_size == (1, 1) else "conv3x3"
    return None


def lora_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path}".replace(".", "_")


def block_index(name: str) -> int:
    """sd-scripts' SDXL block index of a `lora_unet_*` name in the SGM layout; -1 for anything else."""
    if not name.startswith(UNET_PREFIX + "_"):
        return -1
    rest = name[len(UNET_PREFIX) + 1:]
    for start, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if rest.startswith(start):
            return first + int(rest[len(start):].split("_")[0])
    if rest.startswith(("time_embed_", "label_emb_")):
        return 0
    if rest.startswith("out_"):
        return NUM_BLOCKS - 1
    return -1


def _descendant_layers(root: nn.Module, containers: tuple[str, ...]) -> Iterator[tuple[str, nn.Module, Kind]]:
    for name, module in root.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_name, child in module.named_modules():
            kind = layer_kind(child)
            if kind is not None:
                yield f"{name}.{child_name}", child, kind


def unet_targets(unet: nn.Module, include_conv: bool, sgm_names: bool = True) -> list[Target]:
    """LoRA targets of a diffusers U-Net; with `include_conv` also the ResNet / resampler layers. Named by their
    SGM module paths (SDXL, sd-scripts' `get_block_index` blocks) or, with `sgm_names` off, their diffusers paths
    (sd-scripts' SD 1.x/2.x names; no block index)."""
    from lorakit.models.unet import unet_module_paths

    sgm_paths = unet_module_paths(dict(unet.config)) if sgm_names else None
    containers = UNET_CONTAINERS + (UNET_CONV_CONTAINERS if include_conv else ())
    targets = []
    for path, module, kind in _descendant_layers(unet, containers):
        name = lora_name(UNET_PREFIX, sgm_paths[path] if sgm_paths is not None else path)
        targets.append(Target(name, module, "unet", kind, block_index(name) if sgm_names else -1))
    return targets


def text_encoder_targets(text_encoder: nn.Module, index: int, prefix: str | None = None,
                         part: Part | None = None) -> list[Target]:
    """LoRA targets of a CLIP text encoder: SDXL's index 1 = CLIP-L `lora_te1`, 2 = OpenCLIP-bigG `lora_te2`;
    `prefix` and `part` for a family with one encoder (SD 1.x/2.x: `lora_te`, part "te")."""
    prefix = prefix or TE_PREFIXES[index - 1]
    targets = []
    for path, module, kind in _descendant_layers(text_encoder, TE_CONTAINERS):
        # transformers 5 dropped the `text_model.` level; the file names keep it (sd-scripts ran on 4.x).
        if not path.startswith("text_model."):
            path = "text_model." + path
        targets.append(Target(lora_name(prefix, path), module, part or ("te1" if index == 1 else "te2"), kind, -1))
    return targets


def diffusers_to_sgm_names(unet: nn.Module) -> dict[str, str]:
    """`lora_unet_down_blocks_1_attentions_0_…` (diffusers-style LoRA names) -> the SGM-style name."""
    from lorakit.models.unet import unet_module_paths

    return {lora_name(UNET_PREFIX, path): lora_name(UNET_PREFIX, sgm)
            for path, sgm in unet_module_paths(dict(unet.config)).items()}


def to_sgm_names(state: Mapping[str, Tensor], unet: nn.Module | None) -> dict[str, Tensor]:
    """Rename diffusers-style `lora_unet_*` module names to sd-scripts' SGM names; other keys pass unchanged."""
    names = diffusers_to_sgm_names(unet) if unet is not None else {}
    converted = {}
    for key, value in state.items():
        name, dot, rest = key.partition(".")
        converted[names.get(name, name) + dot + rest] = value
    return converted


def sdxl_targets(unet: nn.Module | None, text_encoders: Sequence[nn.Module], include_conv: bool) -> list[Target]:
    """SDXL's: both text encoders (`lora_te1`, `lora_te2`) and the U-Net in SGM names."""
    targets = [t for index, encoder in enumerate(text_encoders, start=1) for t in text_encoder_targets(encoder, index)]
    return targets + (unet_targets(unet, include_conv) if unet is not None else [])


@dataclass(frozen=True)
class LoRALayout:
    """Which layers of a family's models carry LoRA, and how LoRA files name them (a family's `lora`)."""

    targets: Callable[[nn.Module | None, Sequence[nn.Module], bool], list[Target]]  # (U-Net, encoders, conv?)
    file_names: Callable[[Mapping[str, Tensor], nn.Module | None], dict[str, Tensor]]  # a file's keys, renamed
    block_args: bool = True  # block_dims / *_lr_weight of --network_args (SDXL's 23 blocks) apply


SDXL_LORA = LoRALayout(sdxl_targets, to_sgm_names)
