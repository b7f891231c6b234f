"""Captions to text conditioning (`CaptionEncoder`), and its cache (`--cache_text_encoder_outputs`, `..._to_disk`).

A family's text conditioning is its encoders' outputs for a batch of captions: with SDXL's two encoders the context
(both penultimate states, concatenated) and TE2's pooled vector, with SD 1.x/2.x's one encoder the context alone
(its last layer, or the one --clip_skip names, normed as sd-scripts does).

What is cached is the caption as training would use it (prefix, suffix, secondary separator and a
single-choice wildcard applied), not the raw caption file as in sd-scripts; options that would make the
caption differ between draws are refused. Each image's file `<stem>_lorakit_te.safetensors` holds the context
(and the pooled vector when the family has one), in the encoders' dtype, with a fingerprint of the exact
caption, the tokenizers, the encoders, their dtype, `max_token_length`, the weighting and --clip_skip. A file
that does not read back or does not match is recomputed; writes are atomic.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import CLIPTokenizer

from lorakit.data.captions import CaptionOptions, process_caption, randomising_option
from lorakit.data.weighted_captions import weighted_tokens
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_path
from lorakit.models.text_encoding import encode_single, encode_tokens, sequence_length, tokenize

FORMAT = "lorakit-te/1"


@dataclass(frozen=True)
class TextItem:
    """One image's caption, already processed (see `cached_caption`)."""

    image_path: Path
    caption: str


@dataclass
class CachedText:
    context: torch.Tensor  # [L, width] (SDXL: w1 + w2), L = 77 / 152 / 227
    pooled: torch.Tensor | None  # [projection_dim] (SDXL's TE2), else None

    @property
    def outputs(self) -> tuple[torch.Tensor, ...]:
        return (self.context,) if self.pooled is None else (self.context, self.pooled)


@dataclass
class CaptionEncoder:
    """A family's live text conditioning: its tokenizers and encoders, caption length, weights and CLIP skip."""

    tokenizers: tuple[CLIPTokenizer, ...]
    encoders: tuple[torch.nn.Module, ...]
    max_token_length: int | None
    weighted: bool = False
    clip_skip: int | None = None

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, ...]:
        return encode_captions(captions, self.tokenizers, self.encoders, self.max_token_length, self.weighted,
                               self.clip_skip)


def check_text_caching_allowed(subset: str, options: CaptionOptions, captions: Mapping[Path, str]) -> None:
    """Refuse caption options whose randomness a cached embedding cannot follow, naming the option."""
    for image_path, caption in captions.items():
        option = randomising_option(caption, options)
        if option == "enable_wildcard":
            raise LorakitError(
                f"{subset}: enable_wildcard with several choices ({image_path}) cannot be used with"
                " --cache_text_encoder_outputs (one embedding is cached per caption); keep one choice per caption"
                " or drop --cache_text_encoder_outputs"
            )
        if option is not None:
            raise LorakitError(
                f"{subset}: {option} cannot be used with --cache_text_encoder_outputs (one embedding is cached per"
                f" caption); turn {option} off or drop --cache_text_encoder_outputs"
            )


def cached_caption(caption: str, options: CaptionOptions) -> str:
    """The caption every draw would produce (call `check_text_caching_allowed` first)."""
    return process_caption(caption, options, random.Random(0))


def text_cache_path(image_path: Path) -> Path:
    return image_path.with_name(f"{image_path.stem}_lorakit_te.safetensors")


def tokenizer_identity(tokenizer: CLIPTokenizer) -> str:
    """A short hash of everything that decides the ids: vocabulary, merges, normalisation, padding id."""
    text = f"{tokenizer.backend_tokenizer.to_str()}|pad={tokenizer.pad_token_id}|max={tokenizer.model_max_length}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_fingerprint(
    tokenizers: Sequence[CLIPTokenizer],
    encoders: Sequence[torch.nn.Module],
    encoders_identity: str,
    max_token_length: int | None,
    weighted: bool,
    clip_skip: int | None = None,
) -> dict[str, str]:
    """Everything but the caption that cached outputs depend on, as safetensors metadata."""
    settings = {
        "format": FORMAT,
        "tokenizers": ",".join(tokenizer_identity(tokenizer) for tokenizer in tokenizers),
        "encoders": encoders_identity,
        "dtype": ",".join(str(encoder.dtype).removeprefix("torch.") for encoder in encoders),
        "max_token_length": str(max_token_length),
        "weighted_captions": str(weighted).lower(),
    }
    return settings if clip_skip is None else settings | {"clip_skip": str(clip_skip)}


def read_cached_text(path: Path, expected: dict[str, str] | None, length: int) -> CachedText | None:
    """The outputs cached at `path`, or None when missing, unreadable, stale or of the wrong length."""
    try:
        with safe_open(str(path), framework="pt") as file:
            if expected is not None and file.metadata() != expected:
                return None
            context = file.get_tensor("context").clone()
            pooled = file.get_tensor("pooled").clone() if "pooled" in file.keys() else None
    except (OSError, SafetensorError):
        return None
    if context.ndim != 2 or context.shape[0] != length or (pooled is not None and pooled.ndim != 1):
        return None
    if not all(torch.isfinite(tensor).all() for tensor in CachedText(context, pooled).outputs):
        return None
    return CachedText(context, pooled)


def write_cached_text(path: Path, entry: CachedText, metadata: dict[str, str]) -> None:
    tensors = {"context": entry.context.contiguous()}
    if entry.pooled is not None:
        tensors["pooled"] = entry.pooled.contiguous()
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def encode_captions(
    captions: Sequence[str],
    tokenizers: Sequence[CLIPTokenizer],
    encoders: Sequence[torch.nn.Module],
    max_token_length: int | None,
    weighted: bool = False,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Captions -> the text conditioning on the encoders' device, weighted per token when asked: with two encoders
    (SDXL) (context [B, L, w1 + w2], pooled [B, P]), with one (SD 1.x/2.x) (context [B, L, w],). The cache and
    training's live text conditioning both encode through here."""
    if weighted:
        pairs = [weighted_tokens(tokenizer, captions, max_token_length) for tokenizer in tokenizers]
        tokens, weights = [t for t, _ in pairs], [w for _, w in pairs]
    else:
        tokens = [tokenize(tokenizer, captions, max_token_length) for tokenizer in tokenizers]
        weights = [None] * len(tokens)
    if len(encoders) == 2:
        return encode_tokens(*encoders, *tokens, *weights)
    return (encode_single(encoders[0], tokens[0], weights[0], clip_skip),)


class TextCache:
    """Cached text-encoder outputs by `TextItem` (or by image path when the image has one caption): held in memory
    (one copy per distinct caption), or read from their files on each access."""

    def __init__(self, items: Sequence[TextItem], by_caption: dict[str, CachedText], to_disk: bool, length: int):
        self._captions: dict[Path, set[str]] = {}
        for item in items:
            self._captions.setdefault(item.image_path, set()).add(item.caption)
        self._by_caption = by_caption
        self.to_disk = to_disk
        self._length = length

    def __len__(self) -> int:
        return len(self._captions)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, TextItem):
            return key.caption in self._captions.get(key.image_path, ())
        return key in self._captions

    def __getitem__(self, key: Path | TextItem) -> CachedText:
        item = key if isinstance(key, TextItem) else self._item_of(key)
        if not self.to_disk:
            return self._by_caption[item.caption]
        path = text_cache_path(item.image_path)
        entry = read_cached_text(path, None, self._length)
        if entry is None:
            raise LorakitError(f"{path}: text-encoder cache file vanished or changed during training; rerun to recache")
        return entry

    def _item_of(self, image_path: Path) -> TextItem:
        captions = self._captions[image_path]
        if len(captions) > 1:
            raise KeyError(f"{image_path} has {len(captions)} cached captions; look it up by its TextItem")
        return TextItem(image_path, next(iter(captions)))


def _check_one_caption_per_file(items: Sequence[TextItem]) -> None:
    """A disk cache keeps one file per image, so an image may not train with two different captions."""
    first: dict[Path, str] = {}
    for item in items:
        caption = first.setdefault(item.image_path, item.caption)
        if caption != item.caption:
            raise LorakitError(
                f"{item.image_path}: two subsets give it different captions ({caption!r} and {item.caption!r}), but"
                " --cache_text_encoder_outputs_to_disk keeps one file per image; give the subsets the same caption"
                " settings or cache in memory (--cache_text_encoder_outputs)"
            )


def cache_text_encoder_outputs(
    items: Sequence[TextItem],
    tokenizers: Sequence[CLIPTokenizer],
    encoders: Sequence[torch.nn.Module],
    *,
    encoders_identity: str,
    max_token_length: int | None = None,
    weighted: bool = False,
    clip_skip: int | None = None,
    batch_size: int = 1,
    to_disk: bool = False,
    progress: bool = True,
    skip_check: bool = False,
) -> TextCache:
    """Encode each distinct caption that has no valid cache once, in batches of `batch_size` captions.

    `skip_check` (--skip_cache_check) uses any existing file that reads back with the right length, without
    comparing its fingerprint."""
    length = sequence_length(max_token_length)
    if to_disk:
        _check_one_caption_per_file(items)

    settings = settings_fingerprint(tokenizers, encoders, encoders_identity, max_token_length, weighted, clip_skip)

    def expected(caption: str) -> dict[str, str]:
        return {**settings, "caption": caption}

    pending: dict[str, list[TextItem]] = {}  # distinct caption -> the images (without a valid file) using it
    for item in items:
        path = text_cache_path(item.image_path)
        if not to_disk or read_cached_text(path, None if skip_check else expected(item.caption), length) is None:
            pending.setdefault(item.caption, []).append(item)
    captions = list(pending)
    by_caption: dict[str, CachedText] = {}
    batch_size = max(1, batch_size)
    bar = tqdm(total=len(captions), unit="caption", desc="caching text encoder outputs", disable=not progress)
    with bar:
        for start in range(0, len(captions), batch_size):
            batch = captions[start : start + batch_size]
            with torch.no_grad():
                outputs = [output.cpu() for output in encode_captions(batch, tokenizers, encoders, max_token_length,
                                                                      weighted, clip_skip)]
            for row, caption in enumerate(batch):
                context, *pooled = (output[row].clone() for output in outputs)
                entry = CachedText(context, pooled[0] if pooled else None)
                if not all(torch.isfinite(tensor).all() for tensor in entry.outputs):
                    raise LorakitError(
                        f"{pending[caption][0].image_path}: the text encoders produced NaN/inf outputs for its caption"
                        f" {caption!r}; expected finite values (check the model file and the precision)"
                    )
                if to_disk:
                    for item in pending[caption]:
                        write_cached_text(text_cache_path(item.image_path), entry, expected(caption))
                else:
                    by_caption[caption] = entry
            bar.update(len(batch))
    return TextCache(items, by_caption, to_disk, length)
