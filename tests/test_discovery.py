"""File discovery as sd-scripts does it (`DreamBoothDataset`, `FineTuningDataset`), regularisation
balancing, counts per epoch (`BaseDataset.make_buckets`) and the
validation split (`split_train_val`, without sd-scripts' train/validation overlap)."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from lorakit.data.config import resolve_datasets
from lorakit.data.dataset import TrainingData
from lorakit.data.discovery import (
    balance_regularisation,
    caption_path,
    discover_datasets,
    load_datasets,
    parse_repeats_folder,
    split_validation,
)
from lorakit.data.records import ImageRecord
from lorakit.data.summary import dataset_summary
from lorakit.errors import LorakitError


def summary_of(dataset) -> str:
    """The summary with the buckets training places the images in (and the batch count training steps by)."""
    data = TrainingData([dataset], seed=0)
    assert len(data) == len(data.epoch_batches(1)) == len(data.epoch_batches(2))
    return dataset_summary([dataset], [data.bucket_counts(0)])


def _images(folder: Path, names, size=(64, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        Image.new("RGB", size, (200, 10, 10)).save(folder / name)
        paths.append(folder / name)
    return paths


def _datasets(tmp_path: Path, toml: str, **command_line):
    path = tmp_path / "dataset.toml"
    path.write_text(textwrap.dedent(toml))
    return load_datasets({"dataset_config": str(path), **command_line})


def _resolve_and_discover(subset: dict, **command_line):
    config = {"general": {"resolution": 64}, "datasets": [{"subsets": [subset]}]}
    return discover_datasets(resolve_datasets(config, command_line, source="test"))


# ------------------------------------------------------------------------------------------- N_name folders


@pytest.mark.parametrize("name, parsed", [
    ("10_sks dog", (10, "sks dog")), ("1_a_b c", (1, "a_b c")), ("3_", (3, "")), ("dogs", None), ("x_1", None),
])
def test_parse_repeats_folder(name, parsed):
    assert parse_repeats_folder(name) == parsed


def test_n_name_layout_gives_repeats_class_tokens_and_balanced_reg(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "train" / "10_sks dog", ["a.png", "b.png", "c.png"])
    _images(tmp_path / "train" / "5_cat", ["d.png", "e.png"])
    _images(tmp_path / "train" / "notes", ["ignored.png"])
    (tmp_path / "train" / "5_cat" / "d.caption").write_text("a tabby cat\nsecond line\n")
    _images(tmp_path / "reg" / "1_dog", [f"r{i:02d}.jpg" for i in range(45)])
    with caplog.at_level(logging.WARNING):
        (dataset,) = load_datasets({"train_data_dir": "train", "reg_data_dir": "reg", "resolution": "64",
                                    "train_batch_size": 4, "prior_loss_weight": 0.5})
    subsets = dataset.settings.subsets
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in subsets] == [
        ("10_sks dog", 10, "sks dog", False), ("5_cat", 5, "cat", False), ("1_dog", 1, "dog", True)]
    train = [r for r in dataset.train if not r.is_reg]
    assert [(r.path.name, r.caption, r.num_repeats, r.loss_weight) for r in train] == [
        ("a.png", "sks dog", 10, 1.0), ("b.png", "sks dog", 10, 1.0), ("c.png", "sks dog", 10, 1.0),
        ("d.png", "a tabby cat", 5, 1.0), ("e.png", "cat", 5, 1.0)]
    # 3 x 10 + 2 x 5 = 40 training samples: the first 40 reg images are used once, 5 are not used.
    reg = [r for r in dataset.train if r.is_reg]
    assert dataset.train_samples == 40 and len(reg) == 40 and dataset.reg_samples == 40
    assert {r.num_repeats for r in reg} == {1} and {r.loss_weight for r in reg} == {0.5}
    assert dataset.reg_images == 45
    assert "'notes' ignored" in caplog.text and "5 of 45 regularisation images are not used" in caplog.text
    # No buckets: one 64x64 bucket of 80 samples -> ceil(80 / 4) = 20 batches.
    assert "batches per epoch: 20" in summary_of(dataset)


def test_images_directly_in_train_data_dir_explain_the_convention(tmp_path):
    _images(tmp_path / "train", ["a.png", "b.png"])
    with pytest.raises(LorakitError) as caught:
        load_datasets({"train_data_dir": str(tmp_path / "train"), "resolution": "64"})
    message = str(caught.value)
    assert "2 images lie directly in it" in message and "parent of N_name subfolders" in message
    assert "10 = repeats per epoch" in message and "\n" not in message


def test_no_dataset_at_all_names_the_flags():
    with pytest.raises(LorakitError, match="pass --dataset_config, or --train_data_dir"):
        load_datasets({"resolution": "64"})


def test_dataset_config_wins_over_train_data_dir(tmp_path, caplog):
    _images(tmp_path / "img", ["a.png"])
    with caplog.at_level(logging.WARNING):
        (dataset,) = _datasets(tmp_path, f"""
            [general]
            resolution = 64
            [[datasets]]
              [[datasets.subsets]]
              image_dir = '{tmp_path / "img"}'
            """, train_data_dir="elsewhere")
    assert len(dataset.train) == 1 and "--train_data_dir is ignored" in caplog.text


# ------------------------------------------------------------------------------------------- regularisation


def _records(repeats: list[int], is_reg: bool) -> list[ImageRecord]:
    return [ImageRecord(path=Path(f"r{i}.png"), caption="", size=(64, 64), subset=None, num_repeats=n,
                        is_reg=is_reg, loss_weight=1.0) for i, n in enumerate(repeats)]


@pytest.mark.parametrize("train_samples, reg_repeats, balanced", [
    (30, [1] * 40, [1] * 30),        # more reg than train: the first 30 used, in order
    (10, [1, 1, 1], [4, 3, 3]),      # too few: one more repeat per image in turn until 10
    (7, [5, 5], [5, 5]),             # whole images are registered: 10 samples, as sd-scripts
    (4, [5, 5], [5]),                # the first image already covers 4: the second is unused
    (6, [2, 1], [4, 2]),             # 3 registered, then +1 +1 +1 (img0, img1, img0)
    (5, [], []),
])
def test_regularisation_balancing(train_samples, reg_repeats, balanced):
    result = balance_regularisation(train_samples, _records(reg_repeats, True))
    assert [r.num_repeats for r in result] == balanced


def test_reg_subset_balanced_to_training_samples(tmp_path):
    _images(tmp_path / "train", ["a.png", "b.png", "c.png"])
    _images(tmp_path / "reg", ["r0.png", "r1.png", "r2.png", "r3.png"])
    (dataset,) = _datasets(tmp_path, f"""
        [general]
        resolution = 64
        batch_size = 7
        [[datasets]]
          [[datasets.subsets]]
          image_dir = '{tmp_path / "train"}'
          num_repeats = 10
          [[datasets.subsets]]
          image_dir = '{tmp_path / "reg"}'
          is_reg = true
        """)
    assert [r.num_repeats for r in dataset.train if r.is_reg] == [8, 8, 7, 7]
    # 30 + 30 samples in one bucket -> ceil(60 / 7) = 9 batches
    assert "batches per epoch: 9" in summary_of(dataset)


# ------------------------------------------------------------------------------------------- validation split


def test_split_sizes_no_overlap_and_seeded():
    records = _records([3] * 10, False)
    train, validation = split_validation(records, 0.2, seed=5)
    assert (len(train), len(validation)) == (8, 2)
    assert {r.path for r in train}.isdisjoint({r.path for r in validation})
    assert {r.path for r in train} | {r.path for r in validation} == {r.path for r in records}
    assert {r.num_repeats for r in validation} == {1} and {r.num_repeats for r in train} == {3}
    assert split_validation(records, 0.2, seed=5) == (train, validation)
    assert len({tuple(r.path for r in split_validation(records, 0.2, seed=s)[1]) for s in range(10)}) > 1


@pytest.mark.parametrize("n, split, sizes", [(7, 0.3, (5, 2)), (10, 0.15, (9, 1)), (3, 0.1, (3, 0)),
                                             (4, 0.5, (2, 2)), (5, 0.0, (5, 0))])
def test_split_counts(n, split, sizes):
    train, validation = split_validation(_records([1] * n, False), split, seed=0)
    assert (len(train), len(validation)) == sizes


def test_reg_subsets_are_never_split(tmp_path):
    _images(tmp_path / "train", [f"t{i}.png" for i in range(10)])
    _images(tmp_path / "reg", [f"r{i}.png" for i in range(10)])
    (dataset,) = _datasets(tmp_path, f"""
        [general]
        resolution = 64
        validation_split = 0.3
        validation_seed = 1
        [[datasets]]
          [[datasets.subsets]]
          image_dir = '{tmp_path / "train"}'
          [[datasets.subsets]]
          image_dir = '{tmp_path / "reg"}'
          is_reg = true
        """)
    assert len(dataset.validation) == 3 and all(r.path.parent.name == "train" for r in dataset.validation)
    assert dataset.train_samples == 7 and dataset.reg_samples == 7


# ------------------------------------------------------------------------------------------- captions


def test_caption_rules(tmp_path, caplog):
    folder = tmp_path / "img"
    _images(folder, ["plain.png", "face_10_20_30_40.png", "multi.png", "none.png", "UPPER.PNG", "mixed.JpG"])
    (folder / "plain.caption").write_text("first line\nsecond line\n")
    (folder / "face.caption").write_text("found through the face-crop stem")
    (folder / "multi.caption").write_text("line one\n\n  line two  \n")
    (folder / "notes.txt").write_text("not an image")
    _images(folder / "sub", ["nested.png"])
    toml = f"""
        [general]
        resolution = 64
        [[datasets]]
          [[datasets.subsets]]
          image_dir = '{folder}'
          class_tokens = 'sks'
        """
    with caplog.at_level(logging.WARNING):
        (dataset,) = _datasets(tmp_path, toml)
    captions = {r.path.name: r.caption for r in dataset.train}
    assert list(captions) == ["UPPER.PNG", "face_10_20_30_40.png", "mixed.JpG", "multi.png", "none.png",
                              "plain.png"]
    assert captions["plain.png"] == "first line"
    assert captions["face_10_20_30_40.png"] == "found through the face-crop stem"
    assert captions["multi.png"] == "line one"
    assert captions["none.png"] == captions["UPPER.PNG"] == "sks"
    assert "3 images have no caption file (.caption): using class_tokens 'sks'" in caplog.text
    (dataset,) = _datasets(tmp_path, toml.replace("class_tokens = 'sks'", "enable_wildcard = true"))
    captions = {r.path.name: r.caption for r in dataset.train}
    assert captions["multi.png"] == "line one\nline two" and captions["none.png"] == ""


def test_missing_caption_warning_lists_five_paths(tmp_path, caplog):
    _images(tmp_path / "img", [f"i{n}.png" for n in range(8)])
    with caplog.at_level(logging.WARNING):
        _datasets(tmp_path, f"""
            [general]
            resolution = 64
            [[datasets]]
              [[datasets.subsets]]
              image_dir = '{tmp_path / "img"}'
            """)
    assert "8 images have no caption file (.caption): using an empty caption" in caplog.text
    assert "i4.png and 3 more" in caplog.text and "i5.png" not in caplog.text


def test_caption_path_prefers_the_exact_stem(tmp_path):
    image = _images(tmp_path, ["a_1_2_3_4.png"])[0]
    (tmp_path / "a.txt").write_text("x")
    assert caption_path(image, ".txt") == tmp_path / "a.txt"
    (tmp_path / "a_1_2_3_4.txt").write_text("y")
    assert caption_path(image, ".txt") == tmp_path / "a_1_2_3_4.txt"
    assert caption_path(image, ".caption") is None


def test_cache_info_written_in_sd_scripts_format_and_never_stale(tmp_path):
    folder = tmp_path / "img"
    _images(folder, ["a.png"], size=(80, 48))
    (folder / "a.caption").write_text("old caption")
    toml = f"""
        [general]
        resolution = 64
        [[datasets]]
          [[datasets.subsets]]
          image_dir = '{folder}'
          cache_info = true
        """
    _datasets(tmp_path, toml)
    cache = json.loads((folder / "metadata_cache.json").read_text())
    assert cache == {str((folder / "a.png").absolute()): {"caption": "old caption", "resolution": [80, 48]}}
    (folder / "a.caption").write_text("new caption")
    later = (folder / "metadata_cache.json").stat().st_mtime + 5
    os.utime(folder / "a.caption", (later, later))
    (dataset,) = _datasets(tmp_path, toml)
    assert dataset.train[0].caption == "new caption"
    assert json.loads((folder / "metadata_cache.json").read_text())[str((folder / "a.png").absolute())][
        "caption"] == "new caption"


# ------------------------------------------------------------------------------------------- fine-tuning, masks


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_fine_tuning_metadata(tmp_path, fmt, caplog):
    folder = tmp_path / "img"
    _images(folder, ["a.png", "b.jpg", "c.webp"], size=(96, 64))
    absolute = str(folder / "c.webp")
    entries = {
        "a": {"caption": "a photo", "tags": "red, square", "image_size": [96, 64]},  # a stem
        "b.jpg": {"tags": "only tags"},  # a file name inside image_dir
        absolute: {"caption": "line one\nline two", "tags": "t1", "image_size": [10, 10]},  # stale size
    }
    if fmt == "json":
        (tmp_path / "meta.json").write_text(json.dumps(entries))
    else:
        (tmp_path / "meta.jsonl").write_text(
            "\n".join(json.dumps({"image_path": key, **value}) for key, value in entries.items()) + "\n")
    toml = f"""
        [general]
        resolution = 64
        caption_separator = '|'
        [[datasets]]
          [[datasets.subsets]]
          image_dir = '{folder}'
          metadata_file = '{tmp_path / f"meta.{fmt}"}'
        """
    with caplog.at_level(logging.WARNING):
        (dataset,) = _datasets(tmp_path, toml)
    assert dataset.settings.kind == "fine_tuning"
    assert [(r.path.name, r.caption, r.size) for r in dataset.train] == [
        ("a.png", "a photo|red, square", (96, 64)), ("b.jpg", "only tags", (96, 64)),
        ("c.webp", "line one\nline two|t1", (96, 64))]
    assert "image_size [10, 10] in the metadata differs" in caplog.text
    (dataset,) = _datasets(tmp_path, toml.replace("caption_separator = '|'", "enable_wildcard = true"))
    assert dataset.train[2].caption == "line one,t1\nline two,t1"


def test_in_json_command_line_mode(tmp_path):
    _images(tmp_path / "img", ["a.png"])
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "hello"}}))
    (dataset,) = load_datasets({"in_json": str(tmp_path / "meta.json"), "train_data_dir": str(tmp_path / "img"),
                                "resolution": "64", "dataset_repeats": 3})
    assert [(r.caption, r.num_repeats) for r in dataset.train] == [("hello", 3)]


def test_jsonl_line_without_image_path(tmp_path):
    (tmp_path / "meta.jsonl").write_text('{"image_path": "a"}\n{"caption": "x"}\n')
    with pytest.raises(LorakitError, match=r'meta.jsonl line 2: expected an object with "image_path"'):
        _resolve_and_discover({"metadata_file": str(tmp_path / "meta.jsonl")})


def test_mask_subset_pairs_masks_and_lists_extra_ones(tmp_path):
    _images(tmp_path / "img", ["a.png", "b.png"])
    _images(tmp_path / "masks", ["a.png", "b.jpg"])
    subset = {"image_dir": str(tmp_path / "img"), "conditioning_data_dir": str(tmp_path / "masks")}
    (dataset,) = _resolve_and_discover(subset, masked_loss=True)
    assert [(r.path.name, r.mask_path.name) for r in dataset.train] == [("a.png", "a.png"), ("b.png", "b.jpg")]
    _images(tmp_path / "masks", ["c.png", "d.png"])
    with pytest.raises(LorakitError, match=r"2 masks have no image: c.png, d.png"):
        _resolve_and_discover(subset, masked_loss=True)


def test_alpha_mask_flag_reaches_records(tmp_path):
    _images(tmp_path / "img", ["a.png"])
    (dataset,) = _resolve_and_discover({"image_dir": str(tmp_path / "img")}, alpha_mask=True)
    assert dataset.train[0].alpha_mask is True


def test_summary_shows_settings_counts_buckets(tmp_path):
    _images(tmp_path / "wide", ["w0.png", "w1.png"], size=(200, 100))
    _images(tmp_path / "tall", ["t0.png"], size=(100, 200))
    (dataset,) = _datasets(tmp_path, f"""
        [general]
        resolution = 512
        enable_bucket = true
        batch_size = 2
        [[datasets]]
          [[datasets.subsets]]
          image_dir = '{tmp_path / "wide"}'
          num_repeats = 3
          shuffle_caption = true
          [[datasets.subsets]]
          image_dir = '{tmp_path / "tall"}'
        """)
    summary = summary_of(dataset)
    # Area 512x512, sides 256..1024 step 64: the closest aspect ratio to 2:1 is 704x320 (2.2; 640x384 is 1.67),
    # to 1:2 it is 320x704. Batches never mix buckets: ceil(6 / 2) + ceil(1 / 2) = 4.
    assert "resolution 512x512, batch size 2, buckets 256..1024 step 64" in summary
    assert "2 images x 3 = 6 samples" in summary and "shuffle_caption=True" in summary
    assert "7 training samples (3 images)" in summary
    assert "buckets (2): 320x704: 1, 704x320: 6" in summary and "batches per epoch: 4" in summary
