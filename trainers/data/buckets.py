"""Aspect-ratio buckets (as in NovelAI's and kohya's trainers) and the resize + crop that fits an image into one.

Every bucket holds about `resolution`² pixels with sides that are multiples of `step`, so a portrait photo trains as
a portrait instead of losing its top and bottom to a square crop.  The crop reports what SDXL's micro-conditioning
needs, in the convention of diffusers' SDXL training script: `original_size` (h, w) before resizing and
`crop_top_left` (y, x) in the resized image.
"""

from __future__ import annotations

import math
import random
from typing import Literal

from PIL import Image

from ..config import DataConfig
from ..errors import ConfigError

Crop = Literal["center", "random"]


class BucketGrid:
    """The set of (width, height) buckets for one resolution, and which bucket an image belongs in."""

    def __init__(self, resolution: int, step: int = 64, min_side: int = 256, max_side: int = 1024):
        if step > resolution:
            raise ConfigError(f"is {step}, above data.resolution ({resolution})", "use 64, or a smaller step",
                              where="data.bucket_step")
        square = resolution // step * step
        # Low resolutions (tiny test models) still get their square bucket even below min_side.
        low = min(math.ceil(min_side / step) * step, square)
        high = max(max_side // step * step, square)
        max_area = resolution * resolution
        buckets = {(square, square)}
        for width in range(low, high + 1, step):
            height = min(high, max_area // width // step * step)
            if height >= low:
                buckets |= {(width, height), (height, width)}
        self.resolution = resolution
        self.buckets: tuple[tuple[int, int], ...] = tuple(sorted(buckets))

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "BucketGrid":
        """The grid `cfg` asks for; with `buckets = false` that is the single square bucket of `resolution`."""
        if not cfg.buckets:
            return cls(cfg.resolution, step=cfg.resolution, min_side=cfg.resolution, max_side=cfg.resolution)
        return cls(cfg.resolution, cfg.bucket_step, cfg.min_bucket_side, cfg.max_bucket_side or 2 * cfg.resolution)

    def assign(self, width: int, height: int) -> tuple[int, int]:
        """The bucket whose aspect ratio is closest to the image's (on a log scale, so 2:1 and 1:2 are symmetric)."""
        log_ratio = math.log(width / height)
        return min(self.buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ratio), -b[0] * b[1]))

    def __repr__(self) -> str:
        return f"BucketGrid(resolution={self.resolution}, buckets={list(self.buckets)})"


def resize_to_cover(image: Image.Image, target_wh: tuple[int, int]) -> Image.Image:
    """Scale (keeping the aspect ratio) to the smallest size that covers `target_wh` on both sides."""
    width, height = image.size
    target_w, target_h = target_wh
    scale = max(target_w / width, target_h / height)
    size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def crop_offsets(size_wh: tuple[int, int], target_wh: tuple[int, int], crop: Crop = "center",
                 rng: random.Random | None = None) -> tuple[int, int]:
    """Top-left (y, x) of a `target_wh` window inside an image of `size_wh`."""
    spare_w, spare_h = size_wh[0] - target_wh[0], size_wh[1] - target_wh[1]
    if spare_w < 0 or spare_h < 0:
        raise ValueError(f"cannot crop {target_wh} out of {size_wh}")
    if crop == "center":
        return round(spare_h / 2), round(spare_w / 2)
    if crop == "random":
        if rng is None:
            raise ValueError("a random crop needs an rng")
        return rng.randint(0, spare_h), rng.randint(0, spare_w)
    raise ValueError(f"unknown crop {crop!r}")

