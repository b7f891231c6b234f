"""Offline CLIP tokenizers: ids of the published CLIP vocabulary, padding of each encoder, truncation."""

from __future__ import annotations

from lorakit.models.tokenizers import load_tokenizers

BOS, EOS = 49406, 49407


def test_ids_of_a_known_caption_on_both_tokenizers() -> None:
    for tokenizer in load_tokenizers():
        assert tokenizer("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
        assert tokenizer("A  Photo of a DOG").input_ids == [BOS, 320, 1125, 539, 320, 1929, EOS]
        assert len(tokenizer) == 49408
        assert tokenizer.model_max_length == 77
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)


def test_te1_pads_with_eos_and_te2_with_exclamation_mark() -> None:
    tokenizer1, tokenizer2 = load_tokenizers()
    ids1 = tokenizer1("a photo of a cat", padding="max_length", max_length=77).input_ids
    ids2 = tokenizer2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids1 == [BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71
    assert ids2 == [BOS, 320, 1125, 539, 320, 2368, EOS] + [0] * 70
    assert (tokenizer1.pad_token, tokenizer1.pad_token_id) == ("<|endoftext|>", EOS)
    assert (tokenizer2.pad_token, tokenizer2.pad_token_id) == ("!", 0)
    # "!" inside a caption keeps its own ids, as in sd-scripts and OpenCLIP (ids as open_clip.tokenize prints them
    # in diffusers issue 4153), not the padding id 0 that diffusers' SDXL tokenizer_2 gives it.
    assert tokenizer1("! !! !!!").input_ids == tokenizer2("! !! !!!").input_ids == [BOS, 256, 748, 995, EOS]


def test_a_caption_longer_than_77_tokens_is_truncated_on_the_right() -> None:
    caption = " ".join(["cat"] * 40 + ["dog"] * 60)
    for tokenizer in load_tokenizers():
        ids = tokenizer(caption, padding="max_length", truncation=True, max_length=77).input_ids
        assert ids == [BOS] + [2368] * 40 + [1929] * 35 + [EOS]


def test_tokenizers_are_cached() -> None:
    assert load_tokenizers() is load_tokenizers()


def test_tokenizer_cache_dir_saves_once_then_loads_what_is_there(tmp_path):
    from lorakit.models.tokenizers import CACHE_NAMES, cached_tokenizers

    first = cached_tokenizers(tmp_path)
    saved = {name: (tmp_path / name / "tokenizer_config.json").stat().st_mtime_ns for name in CACHE_NAMES}
    second = cached_tokenizers(tmp_path)
    assert {name: (tmp_path / name / "tokenizer_config.json").stat().st_mtime_ns for name in CACHE_NAMES} == saved
    for a, b in zip(first, second):
        assert a("a photo of a cat").input_ids == b("a photo of a cat").input_ids
    assert second[1].pad_token_id == 0 and second[0].pad_token_id == 49407
