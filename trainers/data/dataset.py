"""The torch Dataset the loop trains on: each index is one (item, repeat); every random choice it makes (crop, flip,
caption dropout and shuffling) is a pure function of (seed, epoch, index), so any epoch can be replayed exactly
after a resume without saved RNG state.

This module is also the pipeline's front door: the scan and the sampler are importable from here.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig
from .buckets import BucketGrid, crop_offsets, resize_to_cover
from .captions import CaptionRules, apply_caption_rules
from .images import image_size, load_image, load_mask, normalize_image, pil_to_uint8_tensor, uint8_to_pixels, upright_size
from .sampler import BucketBatchSampler
from .scan import DatasetScan, Item, scan_class_images, scan_dataset

__all__ = ["BucketBatchSampler", "DatasetScan", "Item", "TrainingDataset", "collate", "scan_class_images",
           "scan_dataset"]


class TrainingDataset(Dataset):
    """`len` = the sum of repeats. Decoded, resized images are kept in memory per item (`cache_images`), so later
    epochs only crop, flip and convert."""

    def __init__(self, items: Sequence[Item], cfg: DataConfig, *, seed: int, cache_images: bool = True):
        if not items:
            raise ValueError("TrainingDataset needs at least one item")
        self.items = list(items)
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.cache_images = cache_images
        self.rules = CaptionRules.from_config(cfg)
        grid = BucketGrid.from_config(cfg)
        self._sizes = [_upright_size(item) for item in self.items]
        self._buckets = [grid.assign(*size) for size in self._sizes]
        self._ends = list(itertools.accumulate(item.repeats for item in self.items))
        self._resized: dict[int, torch.Tensor] = {}
        self._resized_masks: dict[int, torch.Tensor | None] = {}

    # ---- what the loop asks --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._ends[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside a dataset of {len(self)}")
        return bisect.bisect_right(self._ends, index)

    def bucket_of(self, index: int) -> tuple[int, int]:
        """(width, height) of the sample at `index`."""
        return self._buckets[self.item_index(index)]

    @property
    def pixels_are_static(self) -> bool:
        """No per-step randomness in the pixels apart from the reported `flipped`: VAE latents can be cached per
        (item, flipped)."""
        return self.cfg.crop == "center"

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.item_index(index)
        flipped = self.cfg.flip and self._rng(index, "flip").random() < 0.5
        caption = apply_caption_rules(self.items[item].caption, self.rules, self._rng(index, "caption"))
        return self._example(item, flipped, caption, self._rng(index, "crop"), index)

    # ---- internals -----------------------------------------------------------------------------------------
    def _rng(self, index: int, purpose: str) -> random.Random:
        # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and Python runs.
        return random.Random(f"{self.seed}/{self.epoch}/{index}/{purpose}")

    def _example(self, item: int, flipped: bool, caption: str, crop_rng: random.Random | None,
                 index: int) -> dict[str, Any]:
        resized = self._resized_pixels(item)
        target_w, target_h = self._buckets[item]
        height, width = resized.shape[1:]
        top, left = crop_offsets((width, height), (target_w, target_h), self.cfg.crop, crop_rng)
        pixels = resized[:, top:top + target_h, left:left + target_w]
        mask = self._mask(item, index)
        if mask is not None:
            mask = mask[:, top:top + target_h, left:left + target_w]
        if flipped:
            pixels = pixels.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
            left = width - left - target_w  # the crop as seen in the flipped image, as SDXL's conditioning expects
        original_w, original_h = self._sizes[item]
        example = {"pixels": uint8_to_pixels(pixels), "caption": caption, "original_size": (original_h, original_w),
                   "crop_top_left": (top, left), "target_size": (target_h, target_w), "item": item, "flipped": flipped}
        if self.cfg.masked_loss:
            example["mask"] = mask.float().div_(255) if mask is not None else torch.ones(1, target_h, target_w)
        return example

    def _mask(self, item: int, index: int) -> torch.Tensor | None:
        """(1, H, W) uint8 at the resized image's size, or None: no masked loss, no mask, or an unmasked step."""
        source = self.items[item]
        if not self.cfg.masked_loss or source.path is None:
            return None
        if self._rng(index, "unmasked").random() < self.cfg.unmasked_share:
            return None
        if item not in self._resized_masks:
            mask = load_mask(source.path, self._sizes[item])
            self._resized_masks[item] = (None if mask is None else
                                         torch.from_numpy(np.array(resize_to_cover(mask, self._buckets[item])))[None])
        return self._resized_masks[item]

    def _resized_pixels(self, item: int) -> torch.Tensor:
        """The item's image as (3, H, W) uint8, scaled to cover its bucket (cropping happens per step)."""
        cached = self._resized.get(item)
        if cached is not None:
            return cached
        source = self.items[item]
        target = self._buckets[item]
        if source.image is not None:
            image = normalize_image(source.image)
        else:
            width, height = self._sizes[item]
            scale = max(target[0] / width, target[1] / height)
            image = load_image(source.path, at_least=(math.ceil(width * scale), math.ceil(height * scale)))
        pixels = pil_to_uint8_tensor(resize_to_cover(image, target))
        if self.cache_images:
            self._resized[item] = pixels
        return pixels


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the pixels into (B, 3, H, W) and loss masks into (B, 1, H, W); every other field stays a list in batch
    order."""
    batch = {key: [example[key] for example in examples] for key in examples[0]}
    batch["pixels"] = torch.stack(batch["pixels"])
    if "mask" in batch:
        batch["mask"] = torch.stack(batch["mask"])
    return batch


def _upright_size(item: Item) -> tuple[int, int]:
    if item.size is not None:
        return item.size
    if item.image is not None:
        return upright_size(item.image)
    return image_size(item.path)
