"""Captions: sidecar files, encodings, trigger words, tag shuffling, dropout, tag frequency."""

import random
from pathlib import Path

import pytest

from trainers.config import DataConfig
from trainers.data.captions import (CaptionRules, apply_caption_rules, default_caption, read_caption_file,
                                    sidecar_caption, tag_frequency, with_trigger)
from trainers.errors import DataError


def test_sidecar_with_configured_extension(tmp_path: Path):
    (tmp_path / "dog.01.png").touch()
    (tmp_path / "dog.01.txt").write_text("a dog\non grass  \n", encoding="utf-8")
    assert sidecar_caption(tmp_path / "dog.01.png", ".txt") == "a dog on grass"


def test_dot_caption_is_the_fallback_and_extension_without_dot_works(tmp_path: Path):
    (tmp_path / "a.caption").write_text("from .caption", encoding="utf-8")
    assert sidecar_caption(tmp_path / "a.png", ".txt") == "from .caption"
    (tmp_path / "a.tags").write_text("from .tags", encoding="utf-8")
    assert sidecar_caption(tmp_path / "a.png", "tags") == "from .tags"
    assert sidecar_caption(tmp_path / "a.png", "") == "from .caption"


def test_missing_or_empty_sidecar_is_none(tmp_path: Path):
    assert sidecar_caption(tmp_path / "a.png") is None
    (tmp_path / "a.txt").write_text("  \n", encoding="utf-8")
    assert sidecar_caption(tmp_path / "a.png") is None


def test_utf8_bom_is_accepted(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes("\ufeffcafé, crème".encode("utf-8"))
    assert read_caption_file(tmp_path / "a.txt") == "café, crème"


def test_latin1_caption_is_a_data_error_naming_the_file(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8") as caught:
        sidecar_caption(tmp_path / "a.png")
    assert caught.value.where == str(path) and "re-save" in caught.value.fix


def test_default_caption_fills_the_template():
    cfg = DataConfig(default_caption="a photo of {trigger} {class}", trigger_word="sks", class_noun="")
    assert default_caption(cfg) == "a photo of sks"


@pytest.mark.parametrize("caption, expected", [
    ("a photo of a dog on grass", "sks, a photo of a dog on grass"),
    ("a cat sitting", "sks dog, a cat sitting"),
    ("", "sks dog"),
    ("portrait of SKS dog", "portrait of SKS dog"),  # already present: left alone
    ("hotdogs for sale", "sks dog, hotdogs for sale"),  # "dog" inside a word does not count
])
def test_trigger_and_class_are_put_first_when_missing(caption: str, expected: str):
    assert with_trigger(caption, "sks", "dog") == expected


def test_shuffle_keeps_the_first_tags_and_the_trigger_in_place():
    rules = CaptionRules(trigger_word="ohwx", shuffle_tags=True, keep_tokens=2)
    caption = "1girl, solo, red hair, smile, outdoors, ohwx, tree, sky, hat, bag"
    results = {apply_caption_rules(caption, rules, random.Random(seed)) for seed in range(50)}
    assert len(results) > 20  # it really shuffles
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["1girl", "solo"] and tags[5] == "ohwx"
        assert sorted(tags) == sorted(caption.split(", "))


def test_shuffle_with_keep_tokens_zero_moves_everything_but_the_injected_trigger():
    rules = CaptionRules(trigger_word="sks", shuffle_tags=True, keep_tokens=0)
    results = [apply_caption_rules("a, b, c, d", rules, random.Random(seed)) for seed in range(30)]
    assert all(result.startswith("sks, ") for result in results)
    assert {result.split(", ")[1] for result in results} == {"a", "b", "c", "d"}


def test_dropout_rate_matches_the_configured_probability():
    rules = CaptionRules(trigger_word="sks", dropout=0.2)
    rng = random.Random(7)
    results = [apply_caption_rules("a photo", rules, rng) for _ in range(5000)]
    assert 0.18 < results.count("") / len(results) < 0.22
    assert set(results) == {"", "sks, a photo"}


def test_rules_from_config():
    rules = CaptionRules.from_config(DataConfig(trigger_word=" sks ", class_noun="dog"))
    assert rules == CaptionRules(trigger_word="sks", class_noun="dog")


def test_tag_frequency_counts_tags_most_common_first():
    frequency = tag_frequency(["sks, red hair, smile", "sks,  smile ", "sks, hat,,"])
    assert frequency == {"sks": 3, "smile": 2, "red hair": 1, "hat": 1}
    assert list(frequency)[:2] == ["sks", "smile"]
