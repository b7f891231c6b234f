from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lorakit.data.config import default_caption_options
from lorakit.data.text_cache import (
    TextItem,
    cache_text_encoder_outputs,
    cached_caption,
    check_text_caching_allowed,
    read_cached_text,
    text_cache_path,
)
from lorakit.data.weighted_captions import weighted_tokens
from lorakit.errors import LorakitError
from lorakit.fileio import temporary_sibling
from lorakit.models.text_encoders import te1_config, te2_config
from lorakit.models.text_encoding import encode_tokens, tokenize
from lorakit.models.tokenizers import load_tokenizers


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    encoders = (CLIPTextModel(te1_config("tiny")).eval(), CLIPTextModelWithProjection(te2_config("tiny")).eval())
    return load_tokenizers(), encoders


def _reference(models, captions, max_token_length=None):
    tokenizers, encoders = models
    with torch.no_grad():
        tokens = [tokenize(tokenizer, captions, max_token_length) for tokenizer in tokenizers]
        return encode_tokens(*encoders, *tokens)


def _cache(models, items, **kwargs):
    tokenizers, encoders = models
    kwargs.setdefault("encoders_identity", "tiny-0")
    return cache_text_encoder_outputs(items, tokenizers, encoders, progress=False, **kwargs)


def _items(tmp_path: Path, captions: list[str]) -> list[TextItem]:
    return [TextItem(tmp_path / f"img{i}.png", caption) for i, caption in enumerate(captions)]


def test_memory_cache_equals_direct_encoding(models, tmp_path):
    captions = ["a photo of sks dog", "a red car", "a photo of sks dog"]
    items = _items(tmp_path, captions)
    cache = _cache(models, items, batch_size=2)
    context, pooled = _reference(models, captions)
    for row, item in enumerate(items):
        assert cache[item.image_path].context.shape == (77, 128)
        assert torch.allclose(cache[item.image_path].context, context[row], atol=1e-5)
        assert torch.allclose(cache[item.image_path].pooled, pooled[row], atol=1e-5)
    assert cache[items[0].image_path] is cache[items[2].image_path]  # one copy per distinct caption


def test_disk_cache_is_reused_and_recomputed_on_any_change(models, tmp_path):
    items = _items(tmp_path, ["a photo of sks dog", "a red car"])
    cache = _cache(models, items, to_disk=True, batch_size=2)
    paths = [text_cache_path(item.image_path) for item in items]
    assert paths[0].name == "img0_lorakit_te.safetensors"
    inodes = [os.stat(path).st_ino for path in paths]
    context, pooled = _reference(models, [item.caption for item in items])
    assert torch.allclose(cache[items[1].image_path].context, context[1], atol=1e-5)

    _cache(models, items, to_disk=True)
    assert [os.stat(path).st_ino for path in paths] == inodes

    edited = [items[0], TextItem(items[1].image_path, "a blue car")]
    recached = _cache(models, edited, to_disk=True)
    assert os.stat(paths[0]).st_ino == inodes[0] and os.stat(paths[1]).st_ino != inodes[1]
    assert torch.allclose(recached[items[1].image_path].context, _reference(models, ["a blue car"])[0][0], atol=1e-5)

    inodes = [os.stat(path).st_ino for path in paths]
    _cache(models, edited, to_disk=True, encoders_identity="tiny-1")
    assert all(os.stat(path).st_ino != inode for path, inode in zip(paths, inodes))

    long_cache = _cache(models, edited, to_disk=True, encoders_identity="tiny-1", max_token_length=150)
    assert long_cache[items[0].image_path].context.shape == (152, 128)
    expected = _reference(models, ["a photo of sks dog"], 150)[0][0]
    assert torch.allclose(long_cache[items[0].image_path].context, expected, atol=1e-5)


def test_half_written_files_are_recomputed(models, tmp_path):
    items = _items(tmp_path, ["a photo of sks dog"])
    good = _cache(models, items, to_disk=True)[items[0].image_path]
    path = text_cache_path(items[0].image_path)
    complete = path.read_bytes()
    temporary_sibling(path).write_bytes(complete[:100])
    path.write_bytes(complete[: len(complete) // 2])
    assert read_cached_text(path, None, 77) is None
    again = _cache(models, items, to_disk=True)[items[0].image_path]
    assert torch.equal(again.context, good.context) and torch.equal(again.pooled, good.pooled)


def test_weighted_captions_are_cached_weighted(models, tmp_path):
    tokenizers, encoders = models
    items = _items(tmp_path, ["a (red:1.5) car"])
    cached = _cache(models, items, weighted=True)[items[0].image_path]
    with torch.no_grad():
        (ids1, w1), (ids2, w2) = (weighted_tokens(tokenizer, ["a (red:1.5) car"], None) for tokenizer in tokenizers)
        context, pooled = encode_tokens(*encoders, ids1, ids2, w1, w2)
    plain_context, plain_pooled = _reference(models, ["a red car"])
    assert torch.allclose(cached.context, context[0], atol=1e-5)
    assert torch.allclose(cached.context[2], plain_context[0, 2] * 1.5, atol=1e-5)  # BOS, "a", "red"
    assert torch.allclose(cached.context[3], plain_context[0, 3], atol=1e-5)
    assert torch.allclose(cached.pooled, plain_pooled[0], atol=1e-5)  # the pooled vector stays unweighted


def test_cached_caption_is_the_processed_one():
    options = default_caption_options(
        caption_prefix="sks", caption_suffix="photo", secondary_separator=";;", enable_wildcard=True
    )
    assert cached_caption("dog;;cat, {red}", options) == "sks dog,cat, red photo"


@pytest.mark.parametrize(
    "options, option",
    [
        (default_caption_options(shuffle_caption=True), "shuffle_caption"),
        (default_caption_options(caption_dropout_rate=0.1), "caption_dropout_rate"),
        (default_caption_options(caption_dropout_every_n_epochs=2), "caption_dropout_every_n_epochs"),
        (default_caption_options(caption_tag_dropout_rate=0.1), "caption_tag_dropout_rate"),
        (default_caption_options(token_warmup_step=10), "token_warmup_step"),
    ],
)
def test_randomising_options_are_refused(options, option):
    with pytest.raises(LorakitError, match=rf"^datasets\[0\].subsets\[0\]: {option} cannot be used with --cache_text"):
        check_text_caching_allowed("datasets[0].subsets[0]", options, {Path("a.png"): "a, b"})


def test_wildcards_with_several_choices_are_refused_naming_the_image():
    options = default_caption_options(enable_wildcard=True)
    check_text_caching_allowed("datasets[0].subsets[0]", options, {Path("a.png"): "a {red} car"})
    with pytest.raises(LorakitError, match=r"enable_wildcard with several choices \(b.png\)"):
        check_text_caching_allowed(
            "datasets[0].subsets[0]", options, {Path("a.png"): "a {red} car", Path("b.png"): "a {red|blue} car"}
        )


def test_an_image_with_two_captions_trains_with_the_outputs_of_each(models, tmp_path):
    from lorakit.data.dataset import BatchLoader, TrainingData, caption_options
    from lorakit.data.discovery import load_datasets
    from lorakit.testing.datasets import write_image_folder

    write_image_folder(tmp_path / "img", 2, ((64, 64),))
    folder = (tmp_path / "img").as_posix()
    (tmp_path / "dataset.toml").write_text("\n".join(
        f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '{folder}'\n"
        f"  caption_extension = '.txt'\n  caption_prefix = '{prefix}'\n" for prefix in ("first", "second")))
    data = TrainingData(load_datasets({"dataset_config": str(tmp_path / "dataset.toml")}), seed=0)
    items = [TextItem(s.record.path, cached_caption(s.record.caption, caption_options(s.record)))
             for s in data.all_samples()]
    cache = _cache(models, items)
    batches = data.epoch_batches(1)
    loader = BatchLoader(batches, seed=0, epoch=1, step_of_batch=lambda i: 0, max_train_steps=4, text=cache)
    assert len(batches) == 4
    for index in range(len(batches)):
        batch = loader[index]
        assert batch.captions[0].split()[0] in ("first", "second")
        context, pooled = _reference(models, batch.captions)
        torch.testing.assert_close(batch.text[0], context, rtol=0, atol=1e-5)
        torch.testing.assert_close(batch.text[1], pooled, rtol=0, atol=1e-5)
    with pytest.raises(LorakitError, match="two subsets give it different captions .* keeps one file per image"):
        _cache(models, items, to_disk=True)
