"""Aspect-ratio buckets and the resize + crop that feeds SDXL's size/crop conditioning."""

import math
import random

import numpy as np
import pytest
from PIL import Image

from trainers.config import DataConfig
from trainers.data.buckets import BucketGrid, crop_offsets, resize_to_cover
from trainers.errors import ConfigError


@pytest.mark.parametrize("resolution, step, low, high",
                         [(512, 64, 256, 1024), (1024, 64, 512, 2048), (768, 32, 384, 1536)])
def test_every_bucket_fits_the_grid_rules(resolution: int, step: int, low: int, high: int):
    grid = BucketGrid(resolution, step, low, high)
    assert (resolution, resolution) in grid.buckets
    for width, height in grid.buckets:
        assert width % step == 0 and height % step == 0
        assert width * height <= resolution * resolution
        assert low <= min(width, height) and max(width, height) <= high
        assert (height, width) in grid.buckets


def test_buckets_use_most_of_the_pixel_budget_near_square():
    grid = BucketGrid(1024, 64, 512, 2048)
    assert (1216, 832) in grid.buckets and (832, 1216) in grid.buckets  # SDXL's 3:2 training size
    near_square = [b for b in grid.buckets if 0.5 <= b[0] / b[1] <= 2]
    assert min(w * h for w, h in near_square) >= 0.85 * 1024 * 1024


@pytest.mark.parametrize("size, expected", [
    ((3000, 2000), (640, 384)), ((2000, 3000), (384, 640)), ((1000, 1000), (512, 512)),
    ((4000, 400), (1024, 256)), ((900, 1200), (448, 576)),
])
def test_assign_picks_the_closest_aspect_ratio(size: tuple[int, int], expected: tuple[int, int]):
    grid = BucketGrid(512, 64, 256, 1024)
    assert grid.assign(*size) == expected
    ratio = math.log(size[0] / size[1])
    best = min(abs(math.log(w / h) - ratio) for w, h in grid.buckets)
    assert abs(math.log(expected[0] / expected[1]) - ratio) == pytest.approx(best)


def test_without_buckets_everything_is_the_square_resolution():
    grid = BucketGrid.from_config(DataConfig(resolution=768, buckets=False))
    assert grid.buckets == ((768, 768),) and grid.assign(300, 1200) == (768, 768)


def test_low_resolution_still_has_its_square_bucket():
    assert BucketGrid.from_config(DataConfig(resolution=64)).buckets == ((64, 64),)


def test_step_above_resolution_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        BucketGrid(64, 128, 64, 1024)
    assert caught.value.where == "data.bucket_step"


def test_resize_to_cover_keeps_aspect_and_covers():
    image = Image.new("RGB", (3000, 2000))
    assert resize_to_cover(image, (640, 384)).size == (640, 427)
    assert resize_to_cover(Image.new("RGB", (100, 80)), (512, 512)).size == (640, 512)  # upscales small images


def resize_and_crop(image: Image.Image, target_wh: tuple[int, int], crop="center", rng=None):
    """What the dataset does to an image: cover the bucket, then crop the window it reports."""
    resized = resize_to_cover(image, target_wh)
    top, left = crop_offsets(resized.size, target_wh, crop, rng)
    return resized.crop((left, top, left + target_wh[0], top + target_wh[1])), (top, left)


def test_center_crop_coordinates_match_the_diffusers_convention():
    image = Image.new("RGB", (1000, 500))
    image.paste((255, 0, 0), (500, 0, 1000, 500))  # right half red
    cropped, crop_top_left = resize_and_crop(image, (256, 256))
    # resized to 512x256; diffusers: x1 = round((512 - 256) / 2) = 128
    assert crop_top_left == (0, 128) and cropped.size == (256, 256)
    pixels = np.asarray(cropped)
    assert pixels[10, 10].tolist() == [0, 0, 0] and pixels[10, 250].tolist() == [255, 0, 0]


def test_random_crop_is_inside_and_reproducible():
    offsets = [crop_offsets((700, 300), (512, 256), "random", random.Random(seed)) for seed in range(200)]
    assert all(0 <= y <= 44 and 0 <= x <= 188 for y, x in offsets)
    assert len(set(offsets)) > 100
    assert offsets[:5] == [crop_offsets((700, 300), (512, 256), "random", random.Random(seed)) for seed in range(5)]


def test_random_crop_pixels_come_from_the_reported_window():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (256, 384, 3), dtype=np.uint8))
    cropped, (top, left) = resize_and_crop(image, (128, 256), "random", random.Random(3))
    assert np.array_equal(np.asarray(cropped), np.asarray(image)[top:top + 256, left:left + 128])
