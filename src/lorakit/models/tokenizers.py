"""SDXL's two CLIP tokenizers, built offline from the BPE vocabulary shipped in `lorakit/assets`.

The vocabulary file is OpenAI's/OpenCLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT licence). Both SDXL tokenizers
use it; they differ only in padding: CLIP ViT-L (TE1) pads with `<|endoftext|>`, OpenCLIP bigG (TE2) with `!`.
"""

from __future__ import annotations

import functools
import gzip
import os
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

from lorakit.fileio import atomic_path

MODEL_MAX_LENGTH = 77
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGE_COUNT = 49152 - 256 - 2  # open_clip's SimpleTokenizer: vocab 49408 = 2 * 256 bytes + merges + 2 specials
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# Folder names sd-scripts uses under --tokenizer_cache_dir, so an existing cache is shared both ways.
CACHE_NAMES = ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = resources.files("lorakit").joinpath("assets", _VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]
    characters = _bytes_to_unicode()
    tokens = [*characters, *(c + "</w>" for c in characters), *("".join(m) for m in merges), *_SPECIALS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _tokenizer() -> CLIPTokenizer:
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)


@functools.lru_cache(maxsize=1)
def load_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(TE1 tokenizer, TE2 tokenizer), identical to `openai/clip-vit-large-patch14` and sd-scripts' TE2 tokenizer
    (`laion/CLIP-ViT-bigG-14-laion2B-39B-b160k` with pad id 0). Shared instances: do not mutate them."""
    tokenizer2 = _tokenizer()
    # Only the padding id changes, as in sd-scripts and OpenCLIP: `pad_token="!"` at construction would make "!"
    # a special token, and a caption's "!" would encode as padding (diffusers' SDXL tokenizer_2 does that).
    tokenizer2.pad_token_id = 0
    return _tokenizer(), tokenizer2


def cached_tokenizers(cache_dir: str | os.PathLike) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """--tokenizer_cache_dir: the tokenizers saved there (as sd-scripts saves them), else the shipped ones, which
    are then saved there."""
    folders = [Path(cache_dir) / name for name in CACHE_NAMES]
    if all((folder / "tokenizer_config.json").is_file() for folder in folders):
        tokenizer1, tokenizer2 = (CLIPTokenizer.from_pretrained(str(folder)) for folder in folders)
        tokenizer2.pad_token_id = 0
        return tokenizer1, tokenizer2
    tokenizers = load_tokenizers()
    for folder, tokenizer in zip(folders, tokenizers):
        with atomic_path(folder) as temporary:
            tokenizer.save_pretrained(str(temporary))
    return tokenizers
