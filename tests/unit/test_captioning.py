"""BLIP captioning as a library, with the tiny random BLIP: prompts, trigger word and class noun, batch sizes,
progress and stopping, caption files, and the errors for a missing or unreachable model."""

from pathlib import Path

import pytest
from PIL import Image

from tiny_models import tiny_blip_dir
from trainers.captioning import (HUB_MODELS, BlipCaptioner, CaptionSettings, caption_images,
                                 write_caption_files)
from trainers.errors import ConfigError, ModelError

COLOURS = ("red", "blue", "green", "yellow", "white")


@pytest.fixture(scope="module")
def captioner():
    with BlipCaptioner(tiny_blip_dir()) as loaded:
        yield loaded


@pytest.fixture
def images() -> list[Image.Image]:
    return [Image.new("RGB", (64 + 8 * n, 64), colour) for n, colour in enumerate(COLOURS)]


def test_a_prompt_is_continued_and_every_caption_is_one_line(captioner, images):
    captions = caption_images(captioner, images, CaptionSettings(prompt="a photo of", max_new_tokens=6))

    assert len(captions) == len(images)
    assert all(caption.startswith("a photo of") and "\n" not in caption for caption in captions)
    assert all(len(caption.split()) <= 3 + 6 for caption in captions)


def test_without_a_prompt_the_caption_is_unconditional(captioner, images):
    [caption] = caption_images(captioner, images[:1], CaptionSettings(prompt="", max_new_tokens=5))
    [prompted] = caption_images(captioner, images[:1], CaptionSettings(prompt="a drawing of", max_new_tokens=5))

    assert caption and not caption.startswith("a drawing of") and prompted.startswith("a drawing of")


def test_trigger_word_and_class_noun_go_in_front_once(captioner, images):
    settings = CaptionSettings(max_new_tokens=4, trigger_word="ohwx", class_noun="robot")
    plain = caption_images(captioner, images[:2], CaptionSettings(max_new_tokens=4))

    captions = caption_images(captioner, images[:2], settings)

    for caption, generated in zip(captions, plain):
        noun = "" if " robot" in f" {generated}" else " robot"
        assert caption == f"ohwx{noun}, {generated}"
    only_trigger = caption_images(captioner, images[:1], CaptionSettings(max_new_tokens=4, trigger_word=" ohwx "))
    assert only_trigger[0] == f"ohwx, {plain[0]}"


BATCH_TEST = CaptionSettings(num_beams=2, max_new_tokens=5)


@pytest.fixture(scope="module")
def one_by_one(captioner) -> list[str]:
    images = [Image.new("RGB", (64 + 8 * n, 64), colour) for n, colour in enumerate(COLOURS)]
    return [caption_images(captioner, [image], BATCH_TEST)[0] for image in images]


@pytest.mark.parametrize("batch_size", [2, 16])
def test_batch_size_changes_neither_the_captions_nor_their_order(captioner, images, one_by_one, batch_size):
    progress = []
    settings = CaptionSettings(num_beams=2, max_new_tokens=5, batch_size=batch_size)

    batched = caption_images(captioner, images, settings, on_batch=lambda done, total: progress.append((done, total)))

    assert batched == one_by_one
    assert progress == [(min(done, 5), 5) for done in range(batch_size, 5 + batch_size, batch_size)]


def test_paths_are_read_as_their_batch_comes_up(captioner, images, tmp_path):
    paths = []
    for n, image in enumerate(images[:3]):
        paths.append(tmp_path / f"{n}.png")
        image.save(paths[-1])

    assert caption_images(captioner, paths, CaptionSettings(max_new_tokens=4)) == \
        caption_images(captioner, images[:3], CaptionSettings(max_new_tokens=4))


def test_raising_from_the_progress_callback_stops_between_batches(captioner, images):
    seen = []

    def stop_after_first(done, total):
        seen.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        caption_images(captioner, images, CaptionSettings(batch_size=2, max_new_tokens=3), on_batch=stop_after_first)
    assert seen == [2]


def test_bad_settings_name_the_setting(captioner, images):
    with pytest.raises(ConfigError) as error:
        caption_images(captioner, images, CaptionSettings(batch_size=0))
    assert error.value.where == "batch_size"


def test_caption_files_are_written_beside_the_images(tmp_path):
    (tmp_path / "sub").mkdir()
    images = {tmp_path / "a.png": "ohwx robot, a photo of a toy", tmp_path / "sub" / "b.jpeg": "a photo of a disc"}
    (tmp_path / "a.txt").write_text("old caption")

    written = write_caption_files(images)

    assert written == [tmp_path / "a.txt", tmp_path / "sub" / "b.txt"]
    assert (tmp_path / "a.txt").read_text() == "ohwx robot, a photo of a toy\n"
    assert (tmp_path / "sub" / "b.txt").read_text() == "a photo of a disc\n"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.txt", "b.txt"], "a temporary file is left"


def test_close_frees_the_model_and_can_be_called_twice():
    captioner = BlipCaptioner(tiny_blip_dir())
    captioner.close()
    captioner.close()
    assert captioner.model is None


def test_an_unknown_source_is_a_model_error_listing_the_choices():
    with pytest.raises(ModelError) as error:
        BlipCaptioner("someone/blip-xl")
    assert HUB_MODELS[0] in error.value.fix and error.value.where == "someone/blip-xl"


def test_a_hub_model_offline_says_where_to_put_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not downloaded") as error:
        BlipCaptioner(HUB_MODELS[1])
    assert f"download {HUB_MODELS[1]}" in error.value.fix and "folder" in error.value.fix


def test_an_incomplete_folder_is_a_model_error_naming_it(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError) as error:
        BlipCaptioner(tmp_path)
    assert error.value.where == str(tmp_path)
