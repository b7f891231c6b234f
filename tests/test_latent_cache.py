from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.data.buckets import place_image
from lorakit.data.latent_cache import (
    LatentItem,
    cache_latents,
    check_latent_caching_allowed,
    encode_item,
    latent_cache_path,
    read_cached_latents,
)
from lorakit.errors import LorakitError
from lorakit.fileio import temporary_sibling
from lorakit.models.vae import vae_config

BUCKETS = [(64, 64), (64, 96), (96, 64)]


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**vae_config("tiny")).eval()


def _write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


def _item(path: Path, flip: bool = False, alpha: bool = False, interpolation: str = "lanczos", buckets=BUCKETS):
    with Image.open(path) as image:
        size = image.size
    bucket, resized = place_image(size, buckets, 64 * 64, 64)
    return LatentItem(path, size, bucket, resized, interpolation, flip_aug=flip, alpha_mask=alpha)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    # Few distinct shapes: every new input shape costs the CPU convolutions a one-off set-up.
    sizes = [(80, 64), (64, 64), (70, 70), (100, 64)]
    return [_write_image(tmp_path / f"img{i}.png", size, seed=i) for i, size in enumerate(sizes)]


def test_cached_and_uncached_latents_are_identical(vae, images):
    items = [_item(path, flip=i % 2 == 0) for i, path in enumerate(images)]
    cache = cache_latents(items, vae, vae_identity="tiny-0", batch_size=1, progress=False)
    batched = cache_latents(items, vae, vae_identity="tiny-0", batch_size=3, progress=False)
    for item in items:
        cached, uncached = cache[item.image_path], encode_item(vae, item)
        assert torch.equal(cached.latents, uncached.latents)
        # Batched: the same noise, only the batched convolutions' rounding differs.
        assert torch.allclose(batched[item.image_path].latents, uncached.latents, rtol=0, atol=1e-5)
        assert cached.latents.shape == (4, item.bucket[1] // 8, item.bucket[0] // 8)
        if item.flip_aug:
            assert torch.equal(cached.latents_flipped, uncached.latents_flipped)
            assert not torch.equal(cached.latents_flipped, cached.latents)
        assert cached.crop_left_top == uncached.crop_left_top


def test_disk_cache_round_trip_and_reuse(vae, images):
    items = [_item(path, flip=True) for path in images]
    memory = cache_latents(items, vae, vae_identity="tiny-0", batch_size=3, progress=False)
    disk = cache_latents(items, vae, vae_identity="tiny-0", batch_size=3, to_disk=True, progress=False)
    first = {}
    for item in items:
        path = latent_cache_path(item.image_path, item.bucket)
        assert path.name == f"{item.image_path.stem}_{item.bucket[0]}x{item.bucket[1]}_lorakit.safetensors"
        first[path] = os.stat(path).st_ino
        entry = disk[item.image_path]
        assert torch.equal(entry.latents, memory[item.image_path].latents)
        assert torch.equal(entry.latents_flipped, memory[item.image_path].latents_flipped)
        assert entry.original_size == item.image_size and entry.bucket == item.bucket
        assert entry.resized_size == item.resized_size
    cache_latents(items, vae, vae_identity="tiny-0", batch_size=3, to_disk=True, progress=False)
    assert {path: os.stat(path).st_ino for path in first} == first  # valid files are not rewritten


def _cached_once(vae, item: LatentItem, identity: str = "tiny-0") -> tuple[Path, int, torch.Tensor]:
    cache = cache_latents([item], vae, vae_identity=identity, to_disk=True, progress=False)
    path = latent_cache_path(item.image_path, item.bucket)
    return path, os.stat(path).st_ino, cache[item.image_path].latents


def test_recomputed_when_the_image_changes(vae, tmp_path):
    image = _write_image(tmp_path / "a.png", (80, 64), seed=1)
    path, inode, before = _cached_once(vae, _item(image))
    _write_image(image, (80, 64), seed=2)  # same size, new pixels and mtime
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    _, inode_after, after = _cached_once(vae, _item(image))
    assert inode_after != inode and not torch.equal(before, after)
    assert torch.equal(after, encode_item(vae, _item(image)).latents)


def test_recomputed_when_only_the_mtime_changes(vae, tmp_path):
    image = _write_image(tmp_path / "a.png", (80, 64), seed=1)
    path, inode, _ = _cached_once(vae, _item(image))
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert _cached_once(vae, _item(image))[1] != inode


def test_recomputed_when_the_vae_changes(vae, tmp_path):
    image = _write_image(tmp_path / "a.png", (80, 64), seed=1)
    _, inode, _ = _cached_once(vae, _item(image), identity="vae-A")
    assert _cached_once(vae, _item(image), identity="vae-A")[1] == inode
    assert _cached_once(vae, _item(image), identity="vae-B")[1] != inode


def test_recomputed_when_the_bucket_or_resize_changes(vae, tmp_path):
    image = _write_image(tmp_path / "a.png", (80, 64), seed=1)
    path64, inode, _ = _cached_once(vae, _item(image))
    # Another bucket list puts the image in another bucket: a file of its own, the old one left alone.
    other = _item(image, buckets=[(128, 64), (64, 128)])
    assert other.bucket == (128, 64)
    path128, _, latents = _cached_once(vae, other)
    assert path128 != path64 and latents.shape == (4, 8, 16)
    assert os.stat(path64).st_ino == inode
    # Same bucket, other interpolation: same file name, stale fingerprint, recomputed.
    assert _cached_once(vae, _item(image, interpolation="bicubic"))[1] != inode


def test_a_file_whose_shape_does_not_fit_the_bucket_is_not_used(vae, tmp_path):
    image = _write_image(tmp_path / "a.png", (80, 64), seed=1)
    item = _item(image)
    path, _, latents = _cached_once(vae, item)
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(str(path))
    tensors["latents"] = torch.zeros(4, 4, 4)  # right fingerprint, wrong latent size
    save_file(tensors, str(path), metadata=metadata)
    assert read_cached_latents(path, metadata, item) is None
    _, _, again = _cached_once(vae, item)
    assert torch.equal(again, latents)


def test_half_written_files_are_never_read_as_valid(vae, tmp_path):
    image = _write_image(tmp_path / "a.png", (80, 64), seed=1)
    item = _item(image)
    path, _, good = _cached_once(vae, item)
    complete = path.read_bytes()
    # A process killed mid-write: with atomic writes only the temporary exists, but also simulate a truncated
    # file under the final name (written by something else, or a disk that lost the tail).
    temporary_sibling(path).write_bytes(complete[: len(complete) // 2])
    for cut in (len(complete) // 2, len(complete) - 8, 12):
        path.write_bytes(complete[:cut])
        assert read_cached_latents(path, None, item) is None
        _, _, latents = _cached_once(vae, item)
        assert torch.equal(latents, good)
        assert torch.equal(read_cached_latents(path, None, item).latents, good)


def test_alpha_mask_is_cached(vae, tmp_path):
    image = _write_image(tmp_path / "a.png", (64, 64), seed=3, mode="RGBA")
    item = _item(image, alpha=True)
    entry = cache_latents([item], vae, vae_identity="tiny-0", to_disk=True, progress=False)[image]
    with Image.open(image) as opened:
        alpha = torch.from_numpy(np.asarray(opened.getchannel("A"))).float() / 255.0
    assert torch.equal(entry.alpha_mask, alpha)


def test_nan_latents_name_the_image(tmp_path):
    torch.manual_seed(0)
    broken = AutoencoderKL(**vae_config("tiny")).eval()
    with torch.no_grad():
        broken.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    image = _write_image(tmp_path / "bad.png", (64, 64), seed=1)
    with pytest.raises(LorakitError, match="bad.png: the VAE produced NaN"):
        cache_latents([_item(image)], broken, vae_identity="broken", to_disk=True, progress=False)
    assert not latent_cache_path(image, (64, 64)).exists()


@pytest.mark.parametrize("option", ["color_aug", "random_crop"])
def test_augmentations_that_need_fresh_pixels_are_refused(option):
    expected = rf"datasets\[0\].subsets\[1\]: {option} = true cannot be used with --cache_latents"
    with pytest.raises(LorakitError, match=expected):
        check_latent_caching_allowed("datasets[0].subsets[1]", option == "color_aug", option == "random_crop")
    check_latent_caching_allowed("datasets[0].subsets[1]", False, False)


def test_one_image_in_two_buckets_is_looked_up_by_item(vae, tmp_path):
    image = _write_image(tmp_path / "a.png", (80, 64), seed=1)
    small, large = _item(image), _item(image, buckets=[(128, 64), (64, 128)])
    for to_disk in (False, True):
        cache = cache_latents([small, large, small], vae, vae_identity="tiny-0", to_disk=to_disk, progress=False)
        assert len(cache) == 2 and small in cache and image in cache
        assert cache[small].latents.shape == (4, 8, 8) and cache[large].latents.shape == (4, 8, 16)
        with pytest.raises(KeyError, match="2 buckets"):
            cache[image]
    assert cache_latents([small], vae, vae_identity="tiny-0", progress=False)[image].bucket == (64, 64)


def test_an_image_in_two_datasets_trains_with_the_latents_of_each_datasets_bucket(vae, tmp_path):
    from lorakit.data.dataset import BatchLoader, TrainingData
    from lorakit.data.discovery import load_datasets
    from lorakit.testing.datasets import write_image_folder

    write_image_folder(tmp_path / "img", 2, ((96, 96), (128, 80)))
    folder = (tmp_path / "img").as_posix()
    dataset = "\n".join(f"[[datasets]]\nresolution = {resolution}\nenable_bucket = true\nmin_bucket_reso = 64\n"
                        f"max_bucket_reso = 192\nbucket_reso_steps = 32\n  [[datasets.subsets]]\n"
                        f"  image_dir = '{folder}'\n  caption_extension = '.txt'\n" for resolution in (64, 128))
    (tmp_path / "dataset.toml").write_text(dataset)
    data = TrainingData(load_datasets({"dataset_config": str(tmp_path / "dataset.toml")}), seed=0)
    cache = cache_latents([s.latent_item() for s in data.all_samples()], vae, vae_identity="tiny-0", progress=False)
    batches = data.epoch_batches(1)
    loader = BatchLoader(batches, seed=0, epoch=1, step_of_batch=lambda i: i, max_train_steps=4, latents=cache)
    assert len(loader) == 4  # two images, each in a small and a large bucket
    for index, batch in enumerate(batches):
        (sample,) = batch
        width, height = sample.bucket
        assert loader[index].latents.shape == (1, 4, height // 8, width // 8)


def test_disk_cache_refuses_an_image_encoded_two_ways_in_one_bucket(vae, images):
    plain, flipped = _item(images[0]), _item(images[0], flip=True)
    in_memory = cache_latents([plain, flipped], vae, vae_identity="tiny-0", progress=False)
    assert in_memory[plain].latents_flipped is None and in_memory[flipped].latents_flipped is not None
    with pytest.raises(LorakitError, match=rf"{images[0].name}: two subsets put it in bucket \d+x\d+ with different "
                                           "flip_aug, but --cache_latents_to_disk keeps one file per image and bucket"):
        cache_latents([plain, flipped], vae, vae_identity="tiny-0", to_disk=True, progress=False)
    assert not latent_cache_path(images[0], plain.bucket).exists()  # refused before encoding anything
