"""The values our nodes pass to each other, and their ComfyUI socket types."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_api.v0_0_2 import io

DatasetType = io.Custom("FINETUNE_DATASET")
LoraType = io.Custom("FINETUNE_LORA")


class _DropdownValue(str):
    """The type "COMBO" that ComfyUI's link check (`received != expected`, with a dropdown's option list as the
    expected type) accepts for any dropdown, as the frontend does; against every other type it is plain "COMBO"."""

    def __ne__(self, other: object) -> bool:
        return not isinstance(other, (list, tuple)) and str.__ne__(self, other)

    __hash__ = str.__hash__


class FileNameOutput(io.Custom("COMBO").Output):
    """A file name (e.g. a checkpoint just written) that links into a stock loader's dropdown in the same graph:
    a linked value is not checked against the list, so the file may not exist yet when the graph is queued."""

    @property
    def io_type(self):
        return _DropdownValue("COMBO")

CAPTION_MODES = ("keep", "overwrite", "append")


class NodeError(Exception):
    """A problem stated for the person at the graph: what is wrong, which input or file, and what to do.

    ComfyUI titles its error dialog with the exception's module and name; a short module keeps that readable."""


NodeError.__module__ = "finetune"


def node_error(exc: Exception, inputs: dict[str, str]) -> NodeError:
    """A trainer error (`FinetuneError`: problem, fix, where) restated with the node's input names in place of the
    config fields in `inputs` ({"lora.rank": "rank", ...})."""
    problem, fix, where = getattr(exc, "problem", str(exc)), getattr(exc, "fix", ""), getattr(exc, "where", "")
    for field_name, input_name in sorted(inputs.items(), key=lambda kv: -len(kv[0])):
        fix = fix.replace(field_name, f"the `{input_name}` input")
    where = f"`{inputs[where]}`" if where in inputs else where
    text = f"{where}: {problem}" if where else problem
    return NodeError(f"{text} — {fix}" if fix else text)


@dataclass(frozen=True)
class Entry:
    """One training image: a file on disk, or pixels from another node (`pixels`: HxWx3 float tensor in [0, 1])."""

    caption: str = ""
    path: str | None = None
    pixels: Any = None
    repeats: int = 1
    mask: Any = None
    """With `pixels`: the loss mask, HxW floats in [0, 1] (1 = learn), or None."""


@dataclass(frozen=True)
class TrainingImages:
    """What LoadTrainingImages produces and BLIPCaption refines: images, captions and data options."""

    entries: tuple[Entry, ...]
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    """DataConfig fields chosen on the dataset node (resolution, crop, flip, buckets, repeats...)."""
    skipped: tuple[tuple[str, str], ...] = ()

    def with_captions(self, captions: list[str], mode: str = "overwrite") -> "TrainingImages":
        if mode not in CAPTION_MODES:
            raise ValueError(f"caption mode must be one of {CAPTION_MODES}, got {mode!r}")
        entries = []
        for entry, new in zip(self.entries, captions, strict=True):
            if mode == "keep" and entry.caption:
                caption = entry.caption
            elif mode == "append" and entry.caption:
                caption = f"{entry.caption}, {new}"
            else:
                caption = new
            entries.append(dataclasses.replace(entry, caption=caption))
        return dataclasses.replace(self, entries=tuple(entries))

    def fingerprint(self) -> str:
        """Content hash of images, captions and options: equal fingerprints mean identical training data."""
        digest = hashlib.sha256()
        for entry in self.entries:
            digest.update(entry.caption.encode("utf-8"))
            digest.update(str(entry.repeats).encode())
            if entry.path is not None:
                digest.update(_file_digest(Path(entry.path)))
            elif entry.pixels is not None:
                digest.update(entry.pixels.detach().cpu().numpy().tobytes())
            if entry.mask is not None:
                digest.update(entry.mask.detach().cpu().numpy().tobytes())
        digest.update(repr(sorted(self.options.items())).encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class TrainedLora:
    """A LoRA our trainer wrote (FINETUNE_LORA socket): ApplyLoRA takes it; `name` is its models/loras name."""

    name: str
    path: str
    family: str
    trigger_word: str = ""


def image_batch(images: list[Any], size: tuple[int, int]) -> Any:
    """PIL images as one ComfyUI IMAGE batch (N, H, W, 3) in [0, 1], each centre-cropped and scaled to `size`."""
    import numpy as np
    import torch
    from PIL import ImageOps

    arrays = [np.asarray(ImageOps.fit(image.convert("RGB"), size), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((1, size[1], size[0], 3))


def pixels_to_pil(pixels: Any) -> Any:
    """One picture of an IMAGE batch ((H, W, 3) floats in [0, 1]) as an 8-bit RGB PIL image."""
    from PIL import Image

    return Image.fromarray((pixels.detach().cpu().float().clamp(0, 1) * 255).round().byte().numpy(), "RGB")


def mask_to_pil(mask: Any) -> Any:
    """One mask of a MASK batch ((H, W) floats in [0, 1]) as an 8-bit greyscale PIL image (white = 1)."""
    from PIL import Image

    return Image.fromarray((mask.detach().cpu().float().clamp(0, 1) * 255).round().byte().numpy(), "L")


_DIGEST_CACHE: dict[tuple[str, int, int], bytes] = {}


def _file_digest(path: Path) -> bytes:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGEST_CACHE:
        _DIGEST_CACHE[key] = hashlib.sha256(path.read_bytes()).digest()
    return _DIGEST_CACHE[key]
