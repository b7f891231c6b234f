"""The dataset config: sd-scripts' documented examples resolve to the settings the docs describe, and bad configs
give one-line messages that say what to fix (checked by fragments)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from lorakit.data.config import load_dataset_settings, resolve_datasets
from lorakit.data.discovery import load_datasets
from lorakit.errors import LorakitError


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _settings(tmp_path: Path, text: str, **command_line):
    return load_dataset_settings(_write(tmp_path / "dataset.toml", text), command_line)


# ------------------------------------------------------------------------------------------- documented examples


def test_dreambooth_class_tokens_example(tmp_path):
    # config_README: DreamBooth, class tokens, a regularisation subset.
    (dataset,) = _settings(tmp_path, r"""
        [general]
        enable_bucket = true

        [[datasets]]
        resolution = 512
        batch_size = 4

          [[datasets.subsets]]
          image_dir = 'C:\hoge'
          class_tokens = 'hoge girl'
          num_repeats = 10

          [[datasets.subsets]]
          is_reg = true
          image_dir = 'C:\reg'
          class_tokens = 'girl'
          num_repeats = 1
        """)
    assert dataset.kind == "dreambooth"
    assert (dataset.resolution, dataset.batch_size, dataset.enable_bucket) == ((512, 512), 4, True)
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps) == (256, 1024, 64)
    train, reg = dataset.subsets
    assert (train.image_dir, train.class_tokens, train.num_repeats, train.is_reg) == (Path(r"C:\hoge"), "hoge girl",
                                                                                      10, False)
    assert (reg.class_tokens, reg.num_repeats, reg.is_reg) == ("girl", 1, True)
    assert train.caption_extension == ".caption"  # sd-scripts' argparse default, not ".txt"


def test_caption_file_example_general_values_reach_every_subset(tmp_path):
    (dataset,) = _settings(tmp_path, r"""
        [general]
        shuffle_caption = true
        caption_extension = '.txt'
        keep_tokens = 1

        [[datasets]]
        resolution = 512
        batch_size = 4

          [[datasets.subsets]]
          image_dir = 'C:\hoge'
          num_repeats = 10

          [[datasets.subsets]]
          image_dir = 'C:\fuga'
          num_repeats = 5
        """)
    assert [(s.num_repeats, s.captions.shuffle_caption, s.caption_extension, s.captions.keep_tokens)
            for s in dataset.subsets] == [(10, True, ".txt", 1), (5, True, ".txt", 1)]
    assert [s.class_tokens for s in dataset.subsets] == [None, None]


def test_multiple_datasets_example_resolution_order(tmp_path):
    # config_README's "multiple datasets" example: subset -> dataset -> general.
    first, second = _settings(tmp_path, r"""
        [general]
        shuffle_caption = true
        caption_extension = '.txt'
        keep_tokens = 1

        [[datasets]]
        resolution = 512
        batch_size = 4
        keep_tokens = 2

          [[datasets.subsets]]
          image_dir = 'C:\hoge'
          class_tokens = 'hoge girl'

          [[datasets.subsets]]
          image_dir = 'C:\fuga'
          class_tokens = 'fuga boy'
          keep_tokens = 3

          [[datasets.subsets]]
          is_reg = true
          image_dir = 'C:\reg'
          class_tokens = 'human'
          keep_tokens = 1

        [[datasets]]
        resolution = [768, 768]
        batch_size = 2

          [[datasets.subsets]]
          image_dir = 'C:\piyo'
          metadata_file = 'C:\piyo\piyo_md.json'
        """, train_batch_size=8, resolution="1024")
    assert [s.captions.keep_tokens for s in first.subsets] == [2, 3, 1]
    assert first.kind == "dreambooth" and second.kind == "fine_tuning"
    assert (first.resolution, first.batch_size) == ((512, 512), 4)
    assert (second.resolution, second.batch_size) == ((768, 768), 2)
    (piyo,) = second.subsets
    assert (piyo.captions.keep_tokens, piyo.captions.shuffle_caption) == (1, True)
    assert piyo.metadata_file == Path(r"C:\piyo\piyo_md.json")


def test_command_line_fills_what_the_file_leaves_unset(tmp_path):
    (dataset,) = _settings(tmp_path, """
        [[datasets]]
          [[datasets.subsets]]
          image_dir = 'img'
        """, resolution="1024,768", train_batch_size=3, dataset_repeats=7, caption_extention="txt",
        enable_bucket=True, max_bucket_reso=2048, flip_aug=True, seed=11,
        validation_split=0.25, alpha_mask=True)
    (subset,) = dataset.subsets
    assert (dataset.resolution, dataset.batch_size, dataset.max_bucket_reso) == ((1024, 768), 3, 2048)
    assert (subset.num_repeats, subset.caption_extension, subset.flip_aug) == (7, ".txt", True)
    assert (subset.validation_split, subset.validation_seed, subset.alpha_mask) == (0.25, 11, True)


def test_file_wins_over_command_line_and_defaults_apply(tmp_path):
    (dataset,) = _settings(tmp_path, """
        [general]
        resolution = [1024, 1024]
        batch_size = 2
        [[datasets]]
          [[datasets.subsets]]
          image_dir = 'img'
          num_repeats = 3
        """, train_batch_size=8, dataset_repeats=5, resolution="512")
    (subset,) = dataset.subsets
    assert (dataset.batch_size, dataset.resolution, subset.num_repeats) == (2, (1024, 1024), 3)
    assert (subset.captions.caption_separator, subset.captions.keep_tokens_separator,
            subset.captions.token_warmup_min) == (",", "", 1)
    assert (subset.captions.caption_dropout_rate, subset.validation_split, subset.validation_seed) == (0.0, 0.0, 0)
    assert dict(subset.custom_attributes) == {} and subset.captions.secondary_separator is None


def test_masked_loss_subset_with_flag(tmp_path):
    (dataset,) = _settings(tmp_path, """
        [general]
        resolution = 1024
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "/path/to/a_folder/images"
          caption_extension = ".txt"
          conditioning_data_dir = "/path/to/a_folder/masks"
        """, masked_loss=True)
    assert dataset.kind == "mask"
    assert dataset.subsets[0].conditioning_data_dir == Path("/path/to/a_folder/masks")


def test_validation_docs_example_and_per_subset_split(tmp_path):
    # docs/validation.md writes resolution as a string, which sd-scripts' own schema refuses; lorakit accepts it.
    (dataset,) = _settings(tmp_path, """
        [[datasets]]
        resolution = "1024,1024"
        validation_split = 0.1
        validation_seed = 42
          [[datasets.subsets]]
          image_dir = 'a'
          [[datasets.subsets]]
          image_dir = 'b'
          validation_split = 0.5
          [[datasets.subsets]]
          image_dir = 'c'
          is_reg = true
        """)
    assert dataset.resolution == (1024, 1024)
    assert [(s.validation_split, s.validation_seed) for s in dataset.subsets] == [(0.1, 42), (0.5, 42), (0.0, 42)]


def test_ints_accepted_where_numbers_are_expected(tmp_path):
    (dataset,) = _settings(tmp_path, """
        [general]
        resolution = 1024
        validation_split = 0
        network_multiplier = 1
        caption_dropout_rate = 0
        token_warmup_step = 2
        [[datasets]]
          [[datasets.subsets]]
          image_dir = 'a'
        """)
    (subset,) = dataset.subsets
    assert (subset.validation_split, dataset.network_multiplier, subset.captions.token_warmup_step) == (0.0, 1.0, 2.0)


def test_network_multiplier_other_than_1_warns_that_it_has_no_effect(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="lorakit"):
        (dataset,) = _settings(tmp_path, """
            [[datasets]]
            resolution = 1024
            network_multiplier = 0.5
              [[datasets.subsets]]
              image_dir = 'a'
            """)
    assert dataset.network_multiplier == 0.5
    assert [r.getMessage() for r in caplog.records if "network_multiplier" in r.getMessage()] == [
        f"{tmp_path / 'dataset.toml'}: datasets[0]: network_multiplier = 0.5 has no effect: the LoRA trains at "
        "multiplier 1 (as in sd-scripts)"]


def test_face_crop_aug_range_is_refused_with_its_reason(tmp_path):
    with pytest.raises(LorakitError, match=r"datasets\[0\]\.subsets\[0\]: not supported yet: face_crop_aug_range"):
        _settings(tmp_path, """
            [[datasets]]
            resolution = 1024
              [[datasets.subsets]]
              image_dir = 'a'
              face_crop_aug_range = [2, 3]
            """)


def test_json_config_is_the_same_schema(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({
        "general": {"resolution": [832, 1216], "custom_attributes": {"diff_output_preservation": True}},
        "datasets": [{"subsets": [{"image_dir": "a", "caption_extension": "txt"}]}],
    }))
    (dataset,) = load_dataset_settings(path, {})
    assert dataset.resolution == (832, 1216)
    assert dataset.subsets[0].caption_extension == ".txt"
    assert dict(dataset.subsets[0].custom_attributes) == {"diff_output_preservation": True}


def test_zero_repeats_subset_is_ignored_and_duplicate_dir_too(tmp_path):
    (dataset,) = _settings(tmp_path, """
        [general]
        resolution = 512
        [[datasets]]
          [[datasets.subsets]]
          image_dir = 'a'
          [[datasets.subsets]]
          image_dir = 'b'
          num_repeats = 0
          [[datasets.subsets]]
          image_dir = 'a'
          num_repeats = 4
        """)
    assert [s.table for s in dataset.subsets] == ["datasets[0].subsets[0]"]


# ------------------------------------------------------------------------------------------- bad configs


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """img/ with two images (one with an empty caption file), empty/, masks/ with one mask, meta.json."""
    monkeypatch.chdir(tmp_path)
    for folder in ("img", "empty", "masks", "loose"):
        (tmp_path / folder).mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(tmp_path / "img" / f"{name}.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "img" / "b.txt").write_text("")
    (tmp_path / "img" / "a.bin").write_bytes(b"\xff\xfe\xfa caption")
    (tmp_path / "meta.json").write_text(json.dumps({"img/a.png": {"caption": "x"}, "missing_one": {"caption": "y"}}))
    return tmp_path


def _cfg(body: str, general: str = "resolution = 64") -> str:
    return f"[general]\n{general}\n[[datasets]]\n  [[datasets.subsets]]\n{textwrap.dedent(body)}"


BAD_CONFIGS = {
    "unknown key": (_cfg("image_dir = 'img'\nshuffle_captions = true"), {},
                    ["dataset.toml", "datasets[0].subsets[0]", "unknown key `shuffle_captions`",
                     "did you mean `shuffle_caption`?", "Keys allowed here: num_repeats"]),
    "unknown top key": ("[generl]\nresolution = 64\n", {}, ["unknown key `generl`", "did you mean `general`?"]),
    "dataset key in subset": (_cfg("image_dir = 'img'\nresolution = 512"), {},
                              ["datasets[0].subsets[0]", "`resolution` is a dataset-level key",
                               "put it in [[datasets]] or [general]"]),
    "subset key in general": (_cfg("image_dir = 'img'", general="resolution = 64\nimage_dir = 'img'"), {},
                              ["general", "`image_dir` is a subset-level key", "[[datasets.subsets]]"]),
    "command-line name": (_cfg("image_dir = 'img'", general="resolution = 64\ntrain_batch_size = 2"), {},
                          ["`train_batch_size` is the command-line name", "write `batch_size`"]),
    "command-line only": (_cfg("image_dir = 'img'", general="resolution = 64\nprior_loss_weight = 0.5"), {},
                          ["`prior_loss_weight` is a command-line option (--prior_loss_weight)"]),
    "wrong type int": (_cfg("image_dir = 'img'\nnum_repeats = '10'"), {},
                       ["datasets[0].subsets[0]", "`num_repeats`", "expected an integer", 'found string "10"']),
    "wrong type bool": (_cfg("image_dir = 'img'\nflip_aug = 'yes'"), {},
                        ["`flip_aug`", "expected true or false", 'found string "yes"']),
    "wrong type resolution": (_cfg("image_dir = 'img'", general="resolution = [64, 64, 64]"), {},
                              ["general", "`resolution`", "expected a positive integer or [width, height]",
                               "found array [64, 64, 64]"]),
    "batch size 0": (_cfg("image_dir = 'img'", general="resolution = 64\nbatch_size = 0"), {},
                     ["`batch_size`", "must be > 0", "found integer 0"]),
    "validation_split 1.5": (_cfg("image_dir = 'img'", general="resolution = 64\nvalidation_split = 1.5"), {},
                             ["`validation_split`", "must be < 1", "found float 1.5"]),
    "negative dropout": (_cfg("image_dir = 'img'\ncaption_dropout_rate = -0.1"), {},
                         ["`caption_dropout_rate`", "must be >= 0", "probability"]),
    "bad interpolation": (_cfg("image_dir = 'img'\nresize_interpolation = 'fancy'"), {},
                          ["`resize_interpolation`", "expected one of lanczos", 'found string "fancy"']),
    "missing image_dir": (_cfg("class_tokens = 'sks'"), {}, ["datasets[0].subsets[0]", "image_dir is required"]),
    "missing resolution": (_cfg("image_dir = 'img'", general=""), {},
                           ["datasets[0]", "resolution is required", "--resolution"]),
    "bucket steps": (_cfg("image_dir = 'img'", general="resolution = 64\nbucket_reso_steps = 48"), {},
                     ["bucket_reso_steps = 48", "multiple of 32"]),
    "min bucket above resolution": (
        _cfg("image_dir = 'img'", general="resolution = 64\nenable_bucket = true\nmin_bucket_reso = 128"), {},
        ["min_bucket_reso 128 is larger than the resolution's smaller side 64"]),
    "missing folder": (_cfg("image_dir = 'nowhere'"), {}, ["datasets[0].subsets[0]", "image_dir 'nowhere' not found"]),
    "empty folder": (_cfg("image_dir = 'empty'"), {}, ["image_dir 'empty' holds no images", ".png"]),
    "mixed kinds": (_cfg("image_dir = 'img'\n[[datasets.subsets]]\nmetadata_file = 'meta.json'"), {},
                    ["datasets[0]", "mixes DreamBooth subsets", "fine-tuning subsets", "datasets[0].subsets[1]",
                     "separate [[datasets]]"]),
    "masks without --masked_loss": (_cfg("image_dir = 'img'\nconditioning_data_dir = 'masks'"), {},
                                    ["datasets[0].subsets[0]", "conditioning_data_dir needs --masked_loss"]),
    "missing mask files": (_cfg("image_dir = 'img'\nconditioning_data_dir = 'masks'"), {"masked_loss": True},
                           ["conditioning_data_dir 'masks'", "1 images have no mask: b.png"]),
    "random crop with masks": (_cfg("image_dir = 'img'\nconditioning_data_dir = 'masks'\nrandom_crop = true"),
                               {"masked_loss": True}, ["random_crop is not supported"]),
    "empty caption file": (_cfg("image_dir = 'img'\ncaption_extension = '.txt'"), {},
                           ["caption file img/b.txt is empty"]),
    "caption not utf-8": (_cfg("image_dir = 'img'\ncaption_extension = '.bin'"), {},
                          ["caption file img/a.bin is not UTF-8", "re-save it as UTF-8"]),
    "metadata image missing": (_cfg("metadata_file = 'meta.json'"), {},
                               ["metadata_file 'meta.json'", "1 images not found", "missing_one"]),
    "reg in fine-tuning": (_cfg("metadata_file = 'meta.json'\nis_reg = true"), {},
                           ["is_reg is only for DreamBooth subsets"]),
    "only regularisation": (_cfg("image_dir = 'img'\nis_reg = true"), {},
                            ["only regularisation subsets", "zero batches"]),
    "no subsets": ("[general]\nresolution = 64\n[[datasets]]\nbatch_size = 1\n", {}, ["no [[datasets.subsets]]"]),
    "bad TOML syntax": ("[general]\nresolution = 64\nflip_aug = tru\n", {}, ["invalid TOML", "line 3"]),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_gives_one_clear_line(layout, name):
    text, command_line, fragments = BAD_CONFIGS[name]
    _write(layout / "dataset.toml", text)
    with pytest.raises(LorakitError) as caught:
        load_datasets({"dataset_config": "dataset.toml", **command_line})
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_bad_json_syntax_names_the_line(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{\n  "general": {\n    "resolution": 64,\n  }\n}\n')
    with pytest.raises(LorakitError, match=r"dataset.json: invalid JSON at line 4"):
        load_dataset_settings(path, {})


@pytest.mark.parametrize("name, fragments", [
    ("dataset.yaml", ["unsupported file type '.yaml'", "expected .toml or .json"]),
    ("absent.toml", ["absent.toml", "file not found"]),
])
def test_config_file_type_and_presence(tmp_path, name, fragments):
    if name.endswith(".yaml"):
        (tmp_path / name).write_text("general: {}\n")
    with pytest.raises(LorakitError) as caught:
        load_dataset_settings(tmp_path / name, {})
    assert all(fragment in str(caught.value) for fragment in fragments)


def test_bad_command_line_value_names_the_flag():
    config = {"datasets": [{"subsets": [{"image_dir": "a"}]}]}
    with pytest.raises(LorakitError, match=r"command line: --train_batch_size: must be > 0, found integer 0"):
        resolve_datasets(config, {"train_batch_size": 0, "resolution": "64"}, source="x.toml")
