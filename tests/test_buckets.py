from __future__ import annotations

import random
from collections import Counter

import pytest

from lorakit.data.buckets import (
    Placement,
    aspect_ratio_error,
    batches_per_epoch,
    bucket_for,
    bucket_list,
    bucket_resolutions,
    crop_condition,
    crop_offsets,
    interpolation_for,
    make_batches,
    no_upscale_bucket,
    place_image,
    resized_size,
)
from lorakit.errors import LorakitError

# sd-scripts' `make_bucket_resolutions` (library/model_util.py): resolution 1024, min 256, max 2048, steps 64 ->
# these 41 buckets.
REFERENCE_41 = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 1856), (512, 1920), (512, 1984), (512, 2048),
    (576, 1664), (576, 1728), (576, 1792), (640, 1536), (640, 1600), (704, 1408), (704, 1472), (768, 1280),
    (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
]


def test_bucket_list_is_the_references_41():
    expected = sorted(set(REFERENCE_41) | {(h, w) for w, h in REFERENCE_41})
    assert len(expected) == 41
    assert bucket_resolutions((1024, 1024), 256, 2048, 64) == expected


def test_default_max_1024_gives_25_buckets_each_with_a_1024_side():
    buckets = bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert len(buckets) == 25
    assert all(1024 in bucket for bucket in buckets)
    assert (512, 1024) in buckets


def test_bucketing_disabled_is_one_bucket():
    assert bucket_list((1024, 768), False, 256, 2048, 64) == [(1024, 768)]
    assert bucket_list((1024, 1024), True, 256, 2048, 64) == bucket_resolutions((1024, 1024), 256, 2048, 64)


BUCKETS_1024 = bucket_resolutions((1024, 1024), 256, 2048, 64)


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        # AR 0.75: 896x1152 (0.778, error 0.028) beats 832x1216 (0.684, error 0.066). Image AR < bucket AR, so
        # the width is matched: scale 896/1536, height int(2048 * 0.5833 + 0.5) = int(1195.17) = 1195.
        ((1536, 2048), (896, 1152), (896, 1195)),
        # An image that is a bucket stays as it is.
        ((832, 1216), (832, 1216), (832, 1216)),
        # Square: upscaled to the square bucket.
        ((1000, 1000), (1024, 1024), (1024, 1024)),
        # AR 3 exactly matches 1728x576: scale 0.576, (1728, int(576 + 0.5)).
        ((3000, 1000), (1728, 576), (1728, 576)),
        # AR 2: 1408x704 is exact.
        ((2000, 1000), (1408, 704), (1408, 704)),
        # AR 1.5: 1216x832 (1.4615, error 0.038) beats 1280x768 (1.667) and 1152x896 (1.286); image AR > bucket
        # AR so the height is matched: scale 832/600, width int(900 * 1.3867 + 0.5) = 1248.
        ((900, 600), (1216, 832), (1248, 832)),
    ],
)
def test_predefined_bucket_assignments(image, bucket, resized):
    assert bucket_for(image, BUCKETS_1024) == bucket
    assert resized_size(image, bucket) == resized
    assert place_image(image, BUCKETS_1024, 1024 * 1024, 64) == Placement(bucket, resized)


@pytest.mark.parametrize(
    "image, resized, bucket",
    [
        # 1000x1000 = 1,000,000 px <= 1024^2 = 1,048,576: no resize; bucket floors each side to 64: 960x960.
        ((1000, 1000), (1000, 1000), (960, 960)),
        # Small images are never upscaled: 300x200 -> bucket 256x192.
        ((300, 200), (300, 200), (256, 192)),
        # 2000x1000 (AR 2) > max area: scaled 1448.15 x 724.08. Width first: int(1448.65) = 1448 -> 1408,
        # height int(704 + 0.5) = 704 (AR error 0). Height first: int(724.58) = 724 -> 704, width 1408 (error 0).
        # Ties go to the height-rounded size: (int(704 * 2 + 0.5), 704) = (1408, 704), already a bucket.
        ((2000, 1000), (1408, 704), (1408, 704)),
        # 3000x2000 (AR 1.5): scaled 1254.14 x 836.09. Width first: 1254 -> 1216, height int(810.67 + 0.5) = 811
        # -> 768, AR 1.583 (error 0.083). Height first: 836 -> 832, width int(1248 + 0.5) = 1248 -> 1216,
        # AR 1.4615 (error 0.038) wins: resized (int(832 * 1.5 + 0.5), 832) = (1248, 832), bucket (1216, 832).
        ((3000, 2000), (1248, 832), (1216, 832)),
    ],
)
def test_no_upscale_assignments(image, resized, bucket):
    assert no_upscale_bucket(image, 1024 * 1024, 64) == Placement(bucket, resized)
    assert place_image(image, None, 1024 * 1024, 64) == Placement(bucket, resized)


def test_no_upscale_image_thinner_than_a_step_is_refused():
    with pytest.raises(LorakitError, match="bucket_reso_steps=64"):
        place_image((50, 400), None, 1024 * 1024, 64)


def test_aspect_ratio_error_sign():
    assert aspect_ratio_error((1536, 2048), (896, 1152)) == pytest.approx(896 / 1152 - 0.75)


def test_centre_and_random_crops():
    assert crop_offsets((896, 1195), (896, 1152), False) == (0, 21)
    assert crop_offsets((1248, 832), (1216, 832), False) == (16, 0)
    rng = random.Random(5)
    left, top = crop_offsets((1248, 900), (1216, 832), True, rng)
    expected = random.Random(5)
    assert (left, top) == (expected.randint(0, 32), expected.randint(0, 68))
    with pytest.raises(ValueError):
        crop_offsets((100, 100), (128, 64), False)


def test_crop_condition_is_the_actual_cut_not_the_references_letterbox():
    # 1536x2048 in 896x1152: resized (896, 1195), centre crop cuts 21 rows from the top and nothing from the
    # left. sd-scripts' get_crop_ltrb would feed (top 0, left (896 - 1152 * 0.75) // 2 = 16) instead.
    resized, bucket = (896, 1195), (896, 1152)
    assert crop_condition(resized, bucket, crop_offsets(resized, bucket, False), flipped=False) == (21, 0)
    # Flipped horizontally, a cut of 10 px on the left of 1100 -> 1024 becomes 1100 - 1024 - 10 = 66.
    assert crop_condition((1100, 512), (1024, 512), (10, 0), flipped=True) == (0, 66)


@pytest.mark.parametrize(
    "image, resized, choice, expected",
    [
        ((2000, 1000), (1408, 704), None, "area"),
        ((1000, 1000), (1000, 1000), None, "area"),  # no change in either dimension still counts as shrinking
        ((1000, 1000), (1024, 1024), None, "lanczos"),
        ((2000, 500), (1800, 512), None, "lanczos"),  # shrinks one side, grows the other
        ((2000, 1000), (1408, 704), "bicubic", "bicubic"),
    ],
)
def test_interpolation_rule(image, resized, choice, expected):
    assert interpolation_for(image, resized, choice) == expected


def test_unknown_interpolation_is_refused():
    with pytest.raises(LorakitError, match="resize_interpolation = 'cubik'"):
        interpolation_for((10, 10), (8, 8), "cubik")


def _members():
    # Items name their bucket so a mixed batch is visible; "b" repeats twice as a num_repeats=2 image would.
    return {
        (1024, 1024): [("sq", i) for i in range(7)],
        (832, 1216): [("tall", i) for i in range(5)] + [("tall", 0)],
        (1216, 832): [("wide", 0)],
    }


def test_batches_never_mix_buckets_and_hold_every_item_once_per_repeat():
    members = _members()
    batches = make_batches(members, 4, seed=42, epoch=1)
    assert len(batches) == batches_per_epoch({b: len(m) for b, m in members.items()}, 4) == 2 + 2 + 1
    names = {(1024, 1024): "sq", (832, 1216): "tall", (1216, 832): "wide"}
    for batch in batches:
        assert 1 <= len(batch.items) <= 4
        assert {name for name, _ in batch.items} == {names[batch.bucket]}
    for bucket, items in members.items():
        drawn = [item for batch in batches if batch.bucket == bucket for item in batch.items]
        assert Counter(drawn) == Counter(items)


def test_batches_are_deterministic_per_seed_and_epoch_and_change_between_epochs():
    members = _members()
    first = make_batches(members, 2, seed=42, epoch=1)
    assert make_batches(members, 2, seed=42, epoch=1) == first
    reordered = dict(reversed(list(members.items())))
    assert make_batches(reordered, 2, seed=42, epoch=1) == first
    assert make_batches(members, 2, seed=42, epoch=2) != first
    assert make_batches(members, 2, seed=43, epoch=1) != first


def test_batches_do_not_touch_the_global_rng():
    random.seed(0)
    expected = random.random()
    random.seed(0)
    make_batches(_members(), 2, seed=1, epoch=1)
    assert random.random() == expected


def test_batches_per_epoch_counts_short_batches():
    assert batches_per_epoch({"a": 10, "b": 1, "c": 4}, 4) == 3 + 1 + 1
