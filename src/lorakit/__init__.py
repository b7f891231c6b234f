"""lorakit: train SDXL LoRA adapters, a drop-in replacement for sd-scripts' sdxl_train_network.py."""

__version__ = "0.1.0"
