"""The latent cache (`--cache_latents`, `--cache_latents_to_disk`, `--vae_batch_size`).

Images are encoded once, in batches of one bucket, exactly as training would prepare them (resize to cover,
centre crop, optional flip). On disk each image gets `<stem>_<W>x<H>_lorakit.safetensors` beside it (W x H
= the bucket, so several resolutions can be cached side by side; sd-scripts' `_sdxl.npz` cannot collide).
A file is used only when it reads back, its fingerprint (VAE, bucket, resize, crop, image file) matches and
its shapes fit the bucket; anything else is recomputed. Writes are atomic.

Randomness: a latent is one sample of the VAE's posterior, drawn with a CPU generator seeded from the image
file's name and the flip (not from `--seed`), so cached and uncached latents of an image draw the same noise
whatever batch they are encoded in, and a cache stays valid when only the training seed changes. They are
bit-identical with `vae_batch_size` 1; batched convolutions may round differently (about 1e-6).
Latents are stored raw (not times the scaling factor) in the dtype the VAE produced, which loses nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lorakit.data.buckets import Size, crop_offsets
from lorakit.data.images import load_image
from lorakit.data.transforms import image_tensor, mask_tensor
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_path

FORMAT = "lorakit-latents/1"
NOISE = "sample, cpu generator seeded by sha256(file name | flip)"
LOADER_THREADS = min(8, os.cpu_count() or 1)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentItem:
    """One image to cache, as the dataset resolved it."""

    image_path: Path
    image_size: Size  # (width, height) as displayed, EXIF orientation applied
    bucket: Size
    resized_size: Size
    interpolation: str  # resolved name (see buckets.interpolation_for)
    flip_aug: bool = False
    alpha_mask: bool = False


@dataclass
class CachedLatents:
    """What training needs of one image when its latents are cached."""

    latents: torch.Tensor  # [C, H/8, W/8], raw VAE sample
    latents_flipped: torch.Tensor | None
    alpha_mask: torch.Tensor | None  # [H, W] in [0, 1], unflipped (flip it with the flipped latents)
    original_size: Size  # (width, height)
    resized_size: Size
    bucket: Size
    crop_left_top: Size  # window cut from the resized image (unflipped)


def check_latent_caching_allowed(subset: str, color_aug: bool, random_crop: bool) -> None:
    """A cached latent fixes one crop and one colour: refuse the augmentations that need a fresh image."""
    for name, active in (("color_aug", color_aug), ("random_crop", random_crop)):
        if active:
            raise LorakitError(
                f"{subset}: {name} = true cannot be used with --cache_latents (a cached latent is encoded once);"
                f" set {name} = false or drop --cache_latents"
            )


def latent_cache_path(image_path: Path, bucket: Size) -> Path:
    return image_path.with_name(f"{image_path.stem}_{bucket[0]}x{bucket[1]}_lorakit.safetensors")


def latent_seed(image_path: Path, flipped: bool) -> int:
    """The generator seed of an image's latent sample (see the module note)."""
    digest = hashlib.sha256(f"{Path(image_path).name}|{int(flipped)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def fingerprint(item: LatentItem, vae_identity: str, vae_dtype: torch.dtype) -> dict[str, str]:
    """Everything a cached latent depends on, as safetensors metadata."""
    stat = item.image_path.stat()
    return {
        "format": FORMAT,
        "vae": vae_identity,
        "vae_dtype": str(vae_dtype).removeprefix("torch."),
        "noise": NOISE,
        "image_size": _size_text(item.image_size),
        "image_bytes": str(stat.st_size),
        "image_mtime_ns": str(stat.st_mtime_ns),
        "bucket": _size_text(item.bucket),
        "resized_size": _size_text(item.resized_size),
        "interpolation": item.interpolation,
        "crop": "center",
        "flip_aug": str(item.flip_aug).lower(),
        "alpha_mask": str(item.alpha_mask).lower(),
    }


def _size_text(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def read_cached_latents(path: Path, expected: dict[str, str] | None, item: LatentItem) -> CachedLatents | None:
    """The cached latents at `path`, or None when the file is missing, unreadable, from other settings
    (`expected` fingerprint; None skips that check) or of the wrong shape."""
    try:
        with safe_open(str(path), framework="pt") as file:
            if expected is not None and file.metadata() != expected:
                return None
            # Copies, not views of the mapped file: a later rewrite of the file must not change them.
            tensors = {key: file.get_tensor(key).clone() for key in file.keys()}
    except (OSError, SafetensorError):
        return None
    width, height = item.bucket
    latents = tensors.get("latents")
    if latents is None or latents.ndim != 3 or tuple(latents.shape[1:]) != (height // 8, width // 8):
        return None
    flipped = tensors.get("latents_flipped")
    if item.flip_aug and (flipped is None or flipped.shape != latents.shape):
        return None
    mask = tensors.get("alpha_mask")
    if item.alpha_mask and (mask is None or tuple(mask.shape) != (height, width)):
        return None
    try:
        left, top, _, _ = tensors["crop_ltrb"].tolist()
        entry = CachedLatents(
            latents=latents,
            latents_flipped=flipped if item.flip_aug else None,
            alpha_mask=mask if item.alpha_mask else None,
            original_size=tuple(tensors["original_size"].tolist()),
            resized_size=tuple(tensors["resized_size"].tolist()),
            bucket=tuple(tensors["bucket"].tolist()),
            crop_left_top=(left, top),
        )
    except (KeyError, ValueError):
        return None
    if entry.bucket != tuple(item.bucket) or not torch.isfinite(latents).all():
        return None
    if flipped is not None and not torch.isfinite(flipped).all():
        return None
    return entry


def write_cached_latents(path: Path, entry: CachedLatents, metadata: dict[str, str]) -> None:
    left, top = entry.crop_left_top
    tensors = {
        "latents": entry.latents.contiguous(),
        "original_size": torch.tensor(entry.original_size, dtype=torch.int64),
        "resized_size": torch.tensor(entry.resized_size, dtype=torch.int64),
        "bucket": torch.tensor(entry.bucket, dtype=torch.int64),
        "crop_ltrb": torch.tensor([left, top, left + entry.bucket[0], top + entry.bucket[1]], dtype=torch.int64),
    }
    if entry.latents_flipped is not None:
        tensors["latents_flipped"] = entry.latents_flipped.contiguous()
    if entry.alpha_mask is not None:
        tensors["alpha_mask"] = entry.alpha_mask.contiguous()
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def prepare_pixels(item: LatentItem) -> tuple[torch.Tensor, torch.Tensor | None, Size]:
    """(pixels [3, H, W] in [-1, 1], alpha mask [H, W] or None, crop (left, top)) as training prepares them."""
    image, alpha = load_image(item.image_path, with_alpha=item.alpha_mask)
    if image.size != tuple(item.image_size):
        raise LorakitError(
            f"{item.image_path}: image is {image.size[0]}x{image.size[1]} px now, {_size_text(item.image_size)} when"
            " the dataset was scanned; expected the file not to change during the run"
        )
    left_top = crop_offsets(item.resized_size, item.bucket, random_crop=False)
    args = (item.resized_size, item.bucket, left_top, item.interpolation)
    pixels = image_tensor(image, *args)
    mask = mask_tensor(alpha, *args) if alpha is not None else None
    return pixels, mask, left_top


@torch.no_grad()
def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """[B, 3, H, W] pixels in [-1, 1] -> raw latent samples [B, C, H/8, W/8], one seeded CPU generator per
    image (so a latent does not depend on its batch)."""
    use_channels_last(vae)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    pixels = pixels.to(vae.device, vae.dtype).contiguous(memory_format=torch.channels_last)
    posterior = vae.encode(pixels).latent_dist
    return posterior.sample(generator=generators).contiguous()


def use_channels_last(vae: AutoencoderKL) -> None:
    """Put the VAE's convolution weights in channels-last layout, once: its convolutions run faster that
    way on the CPU (bench/README.md) and cuDNN prefers it too. Only the speed changes."""
    if not vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
        vae.to(memory_format=torch.channels_last)


def encode_item(vae: AutoencoderKL, item: LatentItem) -> CachedLatents:
    """One image encoded on its own (each view in a VAE call of its own), bit-identical to a cache built with
    `vae_batch_size` 1: the reference the cache is checked against (training without a cache encodes its batches
    with `encode_pixels` instead)."""
    pixels, mask, left_top = prepare_pixels(item)
    views = [(pixels, False), (pixels.flip(-1), True)] if item.flip_aug else [(pixels, False)]
    latents = [
        encode_pixels(vae, view[None], [latent_seed(item.image_path, flipped)]).cpu()[0] for view, flipped in views
    ]
    _check_finite(torch.stack(latents), item)
    return CachedLatents(
        latents=latents[0],
        latents_flipped=latents[1] if item.flip_aug else None,
        alpha_mask=mask,
        original_size=tuple(item.image_size),
        resized_size=tuple(item.resized_size),
        bucket=tuple(item.bucket),
        crop_left_top=left_top,
    )


def _check_finite(latents: torch.Tensor, item: LatentItem) -> None:
    if not torch.isfinite(latents).all():
        raise LorakitError(
            f"{item.image_path}: the VAE produced NaN/inf latents; expected finite values (an fp16 SDXL VAE overflows:"
            " use --no_half_vae, bf16, or the fp16-fix VAE)"
        )


class LatentCache:
    """Cached latents, looked up by `LatentItem` or by image path: held in memory, or read from their files on
    each access."""

    def __init__(self, items: Sequence[LatentItem], entries: dict[LatentItem, CachedLatents], to_disk: bool):
        self._by_path: dict[Path, set[LatentItem]] = {}
        for item in items:
            self._by_path.setdefault(item.image_path, set()).add(item)
        self._entries = entries
        self.to_disk = to_disk

    def __len__(self) -> int:
        return sum(len(items) for items in self._by_path.values())

    def __contains__(self, key: object) -> bool:
        if isinstance(key, LatentItem):
            return key in self._by_path.get(key.image_path, ())
        return key in self._by_path

    def __getitem__(self, key: Path | LatentItem) -> CachedLatents:
        item = key if isinstance(key, LatentItem) else self._item_of(key)
        if not self.to_disk:
            return self._entries[item]
        path = latent_cache_path(item.image_path, item.bucket)
        entry = read_cached_latents(path, None, item)
        if entry is None:
            raise LorakitError(f"{path}: latent cache file vanished or changed during training; rerun to re-cache it")
        return entry

    def _item_of(self, image_path: Path) -> LatentItem:
        items = self._by_path[image_path]
        if len(items) > 1:
            raise KeyError(f"{image_path} is cached in {len(items)} buckets; look it up by its LatentItem")
        return next(iter(items))


def _check_one_item_per_file(items: Sequence[LatentItem]) -> None:
    """A disk cache keeps one file per image and bucket, so an image may not be encoded two ways in one bucket."""
    first: dict[Path, LatentItem] = {}
    for item in items:
        other = first.setdefault(latent_cache_path(item.image_path, item.bucket), item)
        if other != item:
            differ = [name for name in ("interpolation", "flip_aug", "alpha_mask")
                      if getattr(other, name) != getattr(item, name)]
            raise LorakitError(
                f"{item.image_path}: two subsets put it in bucket {_size_text(item.bucket)} with different"
                f" {', '.join(differ)}, but --cache_latents_to_disk keeps one file per image and bucket; give the"
                " subsets the same settings or cache in memory (--cache_latents)"
            )


def cache_latents(
    items: Sequence[LatentItem],
    vae: AutoencoderKL,
    *,
    vae_identity: str,
    batch_size: int = 1,
    to_disk: bool = False,
    progress: bool = True,
    skip_check: bool = False,
) -> LatentCache:
    """Encode every image that has no valid cache (all of them in memory mode), in batches of `batch_size`
    images of one bucket, largest buckets first; flipped copies are encoded alongside.

    `skip_check` (--skip_cache_check) uses any existing file that reads back with the bucket's shapes, without
    comparing its fingerprint (for caches made elsewhere, at the user's risk)."""
    items = list(dict.fromkeys(items))  # an image repeated (num_repeats, several subsets) is encoded once
    if to_disk:
        _check_one_item_per_file(items)
    entries: dict[LatentItem, CachedLatents] = {}
    todo: list[LatentItem] = []
    for item in items:
        if to_disk:
            path = latent_cache_path(item.image_path, item.bucket)
            expected = None if skip_check else fingerprint(item, vae_identity, vae.dtype)
            if read_cached_latents(path, expected, item) is not None:
                continue
        todo.append(item)
    if to_disk and len(todo) < len(items):
        logger.info("latent cache: %d of %d images already cached and valid", len(items) - len(todo), len(items))

    batch_size = max(1, batch_size)
    batches = _batches_by_bucket(todo, batch_size)
    with ThreadPoolExecutor(LOADER_THREADS) as pool, tqdm(
        total=len(todo), unit="img", desc="caching latents", disable=not progress or not todo
    ) as bar:
        pending = _submit(pool, batches[0]) if batches else []
        for index, batch in enumerate(batches):
            prepared = [future.result() for future in pending]
            if index + 1 < len(batches):
                pending = _submit(pool, batches[index + 1])  # decode the next batch while the VAE works
            for item, entry in zip(batch, _encode_batch(vae, batch, prepared, batch_size)):
                if to_disk:
                    write_cached_latents(
                        latent_cache_path(item.image_path, item.bucket),
                        entry,
                        fingerprint(item, vae_identity, vae.dtype),
                    )
                else:
                    entries[item] = entry
            bar.update(len(batch))
    return LatentCache(items, entries, to_disk)


def _batches_by_bucket(items: Sequence[LatentItem], batch_size: int) -> list[list[LatentItem]]:
    by_bucket: dict[Size, list[LatentItem]] = {}
    for item in items:
        by_bucket.setdefault(tuple(item.bucket), []).append(item)
    batches = []
    for bucket in sorted(by_bucket, key=lambda b: (-b[0] * b[1], b)):
        members = by_bucket[bucket]
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return batches


def _submit(pool: ThreadPoolExecutor, batch: Sequence[LatentItem]) -> list[Future]:
    return [pool.submit(prepare_pixels, item) for item in batch]


def _encode_batch(
    vae: AutoencoderKL, batch: Sequence[LatentItem], prepared: list, batch_size: int
) -> list[CachedLatents]:
    pixels, seeds = [], []
    for item, (image, _, _) in zip(batch, prepared):
        pixels.append(image)
        seeds.append(latent_seed(item.image_path, False))
        if item.flip_aug:
            pixels.append(image.flip(-1))
            seeds.append(latent_seed(item.image_path, True))
    # Flipped copies make more VAE inputs than images: keep each VAE call at most batch_size images.
    latents = torch.cat(
        [
            encode_pixels(vae, torch.stack(pixels[i : i + batch_size]), seeds[i : i + batch_size]).cpu()
            for i in range(0, len(pixels), batch_size)
        ]
    )
    entries, row = [], 0
    for item, (_, mask, left_top) in zip(batch, prepared):
        own = latents[row : row + (2 if item.flip_aug else 1)]
        row += len(own)
        _check_finite(own, item)
        entries.append(
            CachedLatents(
                latents=own[0].clone(),
                latents_flipped=own[1].clone() if item.flip_aug else None,
                alpha_mask=mask,
                original_size=tuple(item.image_size),
                resized_size=tuple(item.resized_size),
                bucket=tuple(item.bucket),
                crop_left_top=left_top,
            )
        )
    return entries
