"""The LoRA network: `networks.lora`-compatible modules and names, files with sd-scripts' metadata, applying files."""

from lorakit.network.apply import apply_lora, merge_lora, network_from_file, remove_lora
from lorakit.network.io import build_modelspec, load_network_weights, read_lora, save_lora, save_network
from lorakit.network.network import LoRANetwork, build_network

__all__ = [
    "LoRANetwork", "apply_lora", "build_modelspec", "build_network", "load_network_weights", "merge_lora",
    "network_from_file", "read_lora", "remove_lora", "save_lora", "save_network",
]
