"""Scanning: sources, captions, repeats, validation hold-out, and bad input reported with the file or folder."""

import json
from pathlib import Path

import pytest
from PIL import Image

from trainers.config import DataConfig
from trainers.data.dataset import Item, scan_class_images, scan_dataset
from trainers.errors import ConfigError, DataError


def save(path: Path, size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_folder_is_scanned_recursively_with_sidecars_and_defaults(tmp_path: Path):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red card", encoding="utf-8")
    save(tmp_path / "sub" / "b.JPG", (64, 128))
    save(tmp_path / ".hidden" / "c.png")
    save(tmp_path / "._d.png")
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")

    scan = scan_dataset(DataConfig(folder=str(tmp_path), default_caption="photo of {trigger}", trigger_word="sks",
                                   repeats=3))
    found = [(item.path.relative_to(tmp_path).as_posix(), item.caption, item.repeats, item.size) for item in scan.items]
    assert found == [("a.png", "a red card", 3, (96, 64)), ("sub/b.JPG", "photo of sks", 3, (64, 128))]
    assert scan.num_images == 2 and scan.num_samples == 6 and scan.skipped == [] and scan.uncaptioned == 1


def test_manifest_lines_give_caption_and_repeats(tmp_path: Path):
    save(tmp_path / "imgs" / "one.png")
    save(tmp_path / "imgs" / "two.png")
    (tmp_path / "imgs" / "two.txt").write_text("sidecar caption", encoding="utf-8")
    absolute = save(tmp_path / "elsewhere" / "three.png")
    lines = [{"image": "imgs/one.png", "caption": "first", "repeats": 4}, {"image": "imgs/two.png"},
             {"image": str(absolute), "caption": "third"}]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")

    scan = scan_dataset(DataConfig(manifest=str(manifest), repeats=2))
    assert [(item.path.name, item.caption, item.repeats) for item in scan.items] == [
        ("one.png", "first", 4), ("two.png", "sidecar caption", 2), ("three.png", "third", 2)]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('{"caption": "no image"}', '"image" path'),
    ('{"image": "a.png", "repeats": 0}', '"repeats"'),
    ('{"image": "a.png", "repeats": true}', '"repeats"'),
    ('{"image": "a.png", "caption": 5}', '"caption" must be text'),
    ('{"image": "a.png", "captoin": "typo"}', "unknown key(s) captoin"),
])
def test_bad_manifest_lines_name_the_line(tmp_path: Path, line: str, problem: str):
    save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        scan_dataset(DataConfig(manifest=str(manifest)))
    assert caught.value.where == f"{manifest}:2" and problem in caught.value.problem


def test_manifest_entry_for_a_missing_file_is_skipped(tmp_path: Path):
    save(tmp_path / "here.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "here.png"}\n{"image": "gone.png"}\n', encoding="utf-8")
    scan = scan_dataset(DataConfig(manifest=str(manifest)))
    assert [i.path.name for i in scan.items] == ["here.png"]
    assert scan.skipped == [(tmp_path / "gone.png", "image file not found")]


def test_bad_files_are_skipped_with_reasons_when_good_ones_remain(tmp_path: Path):
    save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello", encoding="utf-8")
    save(tmp_path / "tiny.png", (10, 10))
    (tmp_path / "phone.heic").write_bytes(b"\x00" * 100)

    scan = scan_dataset(DataConfig(folder=str(tmp_path)))
    assert [item.path.name for item in scan.items] == ["good.png"]
    reasons = {path.name: reason for path, reason in scan.skipped}
    assert set(reasons) == {"empty.png", "text.jpg", "tiny.png", "phone.heic"}
    assert "empty" in reasons["empty.png"] and "10×10" in reasons["tiny.png"] and ".heic" in reasons["phone.heic"]
    report = scan.report()
    assert "1 training image(s)" in report and "skipped 4 file(s)" in report and str(tmp_path / "tiny.png") in report


def test_empty_folder_names_the_folder_and_accepted_types(tmp_path: Path):
    (tmp_path / "readme.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        scan_dataset(DataConfig(folder=str(tmp_path)))
    assert caught.value.where == str(tmp_path) and "no images" in caught.value.problem
    assert ".png" in caught.value.fix and ".jpg" in caught.value.fix


def test_only_bad_files_names_the_folder_and_each_reason(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"")
    save(tmp_path / "b.png", (20, 300))
    with pytest.raises(DataError) as caught:
        scan_dataset(DataConfig(folder=str(tmp_path)))
    assert caught.value.where == str(tmp_path)
    assert "a.png: the file is empty" in caught.value.problem and "b.png: too small" in caught.value.problem


def test_missing_folder_and_missing_settings(tmp_path: Path):
    with pytest.raises(DataError, match="folder not found") as caught:
        scan_dataset(DataConfig(folder=str(tmp_path / "nope")))
    assert caught.value.where == str(tmp_path / "nope") and "data.folder" in caught.value.fix
    with pytest.raises(ConfigError) as caught:
        scan_dataset(DataConfig())
    assert caught.value.where == "data.folder"


def test_non_utf8_sidecar_stops_the_scan_naming_the_caption_file(tmp_path: Path):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("naïve".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        scan_dataset(DataConfig(folder=str(tmp_path)))
    assert caught.value.where == str(tmp_path / "a.txt")


def test_validation_fraction_is_deterministic_from_the_seed(tmp_path: Path):
    for n in range(10):
        save(tmp_path / f"{n}.png", color=(n * 20, 0, 0))
    cfg = DataConfig(folder=str(tmp_path), validation_fraction=0.2)
    first, again, other = (scan_dataset(cfg, seed=seed) for seed in (1, 1, 2))
    held = sorted(item.path.name for item in first.validation_items)
    assert len(held) == 2 and first.num_images == 8
    assert held == sorted(item.path.name for item in again.validation_items)
    assert not set(held) & {item.path.name for item in first.items}
    assert held != sorted(item.path.name for item in other.validation_items)


def test_validation_folder_inside_the_training_folder_is_kept_apart(tmp_path: Path):
    save(tmp_path / "train.png")
    save(tmp_path / "val" / "held.png")
    scan = scan_dataset(DataConfig(folder=str(tmp_path), validation_folder=str(tmp_path / "val")))
    assert [i.path.name for i in scan.items] == ["train.png"]
    assert [(i.path.name, i.repeats) for i in scan.validation_items] == [("held.png", 1)]


def test_buckets_are_counted_in_the_scan(tmp_path: Path):
    save(tmp_path / "wide.png", (300, 200))
    save(tmp_path / "tall.png", (200, 300))
    save(tmp_path / "square.png", (100, 100))
    scan = scan_dataset(DataConfig(folder=str(tmp_path), resolution=512))
    assert scan.buckets == {(640, 384): 1, (384, 640): 1, (512, 512): 1}
    assert "640×384: 1" in scan.report()


def test_class_images_are_the_readable_ones_sorted(tmp_path: Path):
    assert scan_class_images(tmp_path / "missing") == []
    save(tmp_path / "b.png")
    save(tmp_path / "nested" / "a.png")
    (tmp_path / "broken.png").write_bytes(b"")
    assert scan_class_images(tmp_path) == [tmp_path / "b.png", tmp_path / "nested" / "a.png"]


def test_item_defaults():
    item = Item(path=None, caption="x", repeats=2, image=Image.new("RGB", (64, 64)))
    assert item.size is None and item.name == "<image in memory>"
