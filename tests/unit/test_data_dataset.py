"""TrainingDataset: shapes, ranges, SDXL conditioning numbers, reproducibility per (seed, epoch, index), caching."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.config import DataConfig
from trainers.data.dataset import Item, TrainingDataset, collate, scan_dataset


def half_and_half(size: tuple[int, int]) -> Image.Image:
    """Left half black, right half white: shows crops and flips in the pixels."""
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name, size in {"wide.png": (300, 200), "tall.png": (200, 300), "square.png": (256, 256)}.items():
        half_and_half(size).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("red, blue, green, yellow, purple", encoding="utf-8")
    return tmp_path


def dataset(folder: Path, seed: int = 0, **data) -> TrainingDataset:
    cfg = DataConfig(folder=str(folder), resolution=128, bucket_step=32, min_bucket_side=64, max_bucket_side=256,
                     **data)
    return TrainingDataset(scan_dataset(cfg).items, cfg, seed=seed)


def test_examples_have_the_bucket_shape_range_and_sdxl_numbers(folder: Path):
    data = dataset(folder, repeats=2)
    assert len(data) == 6
    by_name = {data.items[data[i]["item"]].path.name: data[i] for i in range(len(data))}
    wide = by_name["wide.png"]
    assert wide["pixels"].shape == (3, 96, 160) and wide["pixels"].dtype == torch.float32
    assert wide["pixels"].min() == -1.0 and wide["pixels"].max() == 1.0
    # 300x200 covers 160x96 at 160x107: diffusers-style center crop top = round(11 / 2) = 6 (ties to even)
    assert wide["original_size"] == (200, 300) and wide["target_size"] == (96, 160)
    assert wide["crop_top_left"] == (6, 0) and wide["flipped"] is False
    assert by_name["tall.png"]["pixels"].shape == (3, 160, 96)
    for index in range(len(data)):
        height, width = data[index]["target_size"]
        assert data.bucket_of(index) == (width, height)
    assert {data.bucket_of(i) for i in range(6)} == {(160, 96), (96, 160), (128, 128)}


def test_same_seed_epoch_index_gives_identical_examples(folder: Path):
    settings = dict(crop="random", flip=True, shuffle_tags=True, caption_dropout=0.3)
    first, second = dataset(folder, seed=5, **settings), dataset(folder, seed=5, **settings)
    for epoch in (0, 3):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        for index in range(len(first)):
            a, b = first[index], second[index]
            assert torch.equal(a["pixels"], b["pixels"])
            assert (a["caption"], a["crop_top_left"], a["flipped"]) == (b["caption"], b["crop_top_left"], b["flipped"])


def test_epochs_differ_in_crop_flip_and_caption(folder: Path):
    data = dataset(folder, repeats=4, crop="random", flip=True, shuffle_tags=True, keep_tokens=0)
    draws = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        draws |= {(e["caption"], e["crop_top_left"], e["flipped"]) for e in (data[i] for i in range(len(data)))}
    assert len({d[0] for d in draws}) > 5 and len({d[1] for d in draws}) > 3 and {d[2] for d in draws} == {True, False}


def test_flip_mirrors_pixels_and_reports_the_crop_in_flipped_coordinates(folder: Path):
    data = dataset(folder, flip=True, repeats=8)
    examples = [data[i] for i in range(len(data)) if data.items[data[i]["item"]].path.name == "wide.png"]
    plain = next(e for e in examples if not e["flipped"])
    flipped = next(e for e in examples if e["flipped"])
    assert torch.equal(flipped["pixels"], plain["pixels"].flip(-1))
    assert plain["pixels"][0, 0, 0] == -1.0 and flipped["pixels"][0, 0, 0] == 1.0
    assert flipped["crop_top_left"] == plain["crop_top_left"]  # no horizontal slack: x stays 0 either way


def test_static_flags_follow_the_config(folder: Path):
    assert dataset(folder).pixels_are_static and dataset(folder, flip=True).pixels_are_static
    assert not dataset(folder, crop="random").pixels_are_static



def test_random_crop_stays_inside_the_resized_image(tmp_path: Path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (200, 400, 3), dtype=np.uint8))
    image.save(tmp_path / "noise.png")
    data = dataset(tmp_path, crop="random", buckets=False, repeats=20)
    resized = np.asarray(image.resize((256, 128), Image.Resampling.LANCZOS, reducing_gap=3.0))
    offsets = set()
    for index in range(len(data)):
        example = data[index]
        top, left = example["crop_top_left"]
        assert top == 0 and 0 <= left <= 128
        window = torch.from_numpy(resized[:, left:left + 128].copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(example["pixels"], window)
        offsets.add(left)
    assert len(offsets) > 5


def test_images_are_decoded_once_per_item(folder: Path, monkeypatch: pytest.MonkeyPatch):
    import trainers.data.dataset as module

    data = dataset(folder, repeats=3)
    calls = []
    real = module.load_image
    monkeypatch.setattr(module, "load_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    for epoch in range(2):
        data.set_epoch(epoch)
        [data[i] for i in range(len(data))]
    assert len(calls) == 3


def test_in_memory_items_and_items_without_size(tmp_path: Path):
    half_and_half((128, 128)).save(tmp_path / "file.png")
    items = [Item(path=None, caption="memory", repeats=1, image=half_and_half((200, 100)).convert("RGBA")),
             Item(path=tmp_path / "file.png", caption="file", repeats=2)]
    cfg = DataConfig(resolution=64, buckets=False)
    data = TrainingDataset(items, cfg, seed=0)
    assert len(data) == 3 and [data.item_index(i) for i in range(3)] == [0, 1, 1]
    memory = data[0]
    assert memory["pixels"].shape == (3, 64, 64) and memory["original_size"] == (100, 200)
    assert memory["crop_top_left"] == (0, 32)
    with pytest.raises(IndexError):
        data[3]


def test_validation_items_can_be_wrapped_with_one_repeat(folder: Path):
    cfg = DataConfig(folder=str(folder), validation_fraction=0.4, repeats=5, resolution=64)
    scan = scan_dataset(cfg, seed=3)
    validation = TrainingDataset([dataclasses.replace(i, repeats=1) for i in scan.validation_items], cfg, seed=3)
    assert len(validation) == 1


def test_collate_stacks_pixels_and_keeps_lists(folder: Path):
    data = dataset(folder, buckets=False)
    batch = collate([data[0], data[1]])
    assert batch["pixels"].shape == (2, 3, 128, 128)
    assert batch["item"] == [0, 1] and batch["flipped"] == [False, False]
    assert batch["original_size"] == [data[0]["original_size"], data[1]["original_size"]]
    assert len(batch["caption"]) == 2 and set(batch) == set(data[0])


def test_flipped_crop_offset_is_measured_in_the_mirrored_image(tmp_path: Path):
    half_and_half((301, 200)).save(tmp_path / "odd.png")  # covers 128x128 at 193x128: 65 px of horizontal slack
    data = dataset(tmp_path, flip=True, buckets=False, repeats=16)
    offsets = {data[i]["flipped"]: data[i]["crop_top_left"] for i in range(len(data))}
    assert offsets == {False: (0, 32), True: (0, 33)}  # 193 - 32 - 128 = 33
