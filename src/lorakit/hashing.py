"""The hashes sd-scripts writes into LoRA metadata (`library/train_util.py`: `model_hash`,
`calculate_sha256`, `precalculate_safetensors_hashes`), so UIs recognise our files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LEGACY_HASH_OFFSET = 0x100000  # A1111's "old" hash reads 64 KiB at 1 MiB
LEGACY_HASH_LENGTH = 0x10000


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old model hash (`ss_sd_model_hash`): first 8 hex of SHA-256 of 64 KiB at offset 1 MiB."""
    path = Path(path)
    if path.is_dir():
        return "IsADirectory"
    try:
        with open(path, "rb") as f:
            f.seek(LEGACY_HASH_OFFSET)
            return hashlib.sha256(f.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


def sha256_file(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """SHA-256 of a whole file (`ss_new_sd_model_hash`), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def safetensors_tensor_data(serialized: bytes) -> bytes:
    """The tensor-data section of a safetensors serialisation: what follows the 8-byte length and JSON header."""
    header_length = int.from_bytes(serialized[:8], "little")
    return serialized[8 + header_length:]


def sshs_model_hash(serialized: bytes) -> str:
    """sd-webui-additional-networks' hash: SHA-256 of the tensor data only, so metadata does not change it."""
    return hashlib.sha256(safetensors_tensor_data(serialized)).hexdigest()


def sshs_legacy_hash(serialized_with_ss_metadata_only: bytes) -> str:
    """First 8 hex of SHA-256 over 64 KiB at 1 MiB of a serialisation that carries only the `ss_*` metadata."""
    window = serialized_with_ss_metadata_only[LEGACY_HASH_OFFSET:LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]
    return hashlib.sha256(window).hexdigest()[:8]
