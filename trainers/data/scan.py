"""Finding the training images before training starts: every image is opened once, so a broken file is reported
now (and skipped) instead of crashing step 800.

Sources are `data.folder` (recursive) and `data.manifest` (JSON lines). Nothing is hidden in folder names:
repeats come from `data.repeats` or from a manifest line.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .buckets import BucketGrid
from .captions import default_caption, sidecar_caption
from .images import IMAGE_EXTENSIONS, MASK_SUFFIX, probe_image

MANIFEST_KEYS = ("image", "caption", "repeats")
_UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".dng", ".cr2", ".cr3",
                                           ".nef", ".arw", ".raw"}) - IMAGE_EXTENSIONS
"""Image types people drop into a dataset folder that Pillow cannot read: reported rather than silently ignored."""


@dataclass
class Item:
    """One training image: a file, or an in-memory image (from a node) when `path` is None."""

    path: Path | None
    caption: str
    repeats: int = 1
    image: Image.Image | None = None
    size: tuple[int, int] | None = None
    """Upright (width, height) when already known (the scan fills it), so nothing is opened twice."""

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<image in memory>"


@dataclass
class DatasetScan:
    items: list[Item]
    validation_items: list[Item] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)
    """Training images per (width, height) bucket."""
    uncaptioned: int = 0
    """Training images without a caption of their own (they train on the default caption)."""

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def num_samples(self) -> int:
        """Images per epoch, repeats included."""
        return sum(item.repeats for item in self.items)

    def report(self) -> str:
        lines = [f"{self.num_images} training image(s), {self.num_samples} sample(s) per epoch with repeats, "
                 f"{len(self.validation_items)} held out for validation"]
        if self.uncaptioned:
            lines.append(f"{self.uncaptioned} image(s) have no caption and use the default caption")
        buckets = ", ".join(f"{w}×{h}: {n}" for (w, h), n in sorted(self.buckets.items(), key=lambda kv: -kv[1]))
        lines.append(f"buckets (width×height: images): {buckets}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def scan_dataset(cfg: DataConfig, *, seed: int = 0) -> DatasetScan:
    """Find, check and caption every training (and validation) image `cfg` points at."""
    if not (cfg.folder or cfg.manifest):
        raise ConfigError("no training data given", "set data.folder to a folder of images "
                          "(or data.manifest to a JSON-lines file)", where="data.folder")
    validation_folder = Path(cfg.validation_folder) if cfg.validation_folder else None
    candidates: list[Item] = []
    skipped: list[tuple[Path, str]] = []
    if cfg.folder:
        paths, unsupported = _list_folder(Path(cfg.folder), "data.folder", exclude=validation_folder)
        candidates += [_captioned(path, None, cfg.repeats, cfg) for path in paths]
        skipped += unsupported
    if cfg.manifest:
        candidates += _read_manifest(Path(cfg.manifest), cfg)
    items, unreadable = _probe_all(candidates)
    skipped += unreadable
    if not items:
        sources = " and ".join(s for s in (cfg.folder, cfg.manifest) if s)
        raise _no_images(sources, skipped, "data.folder" if cfg.folder else "data.manifest")

    if validation_folder is not None:
        paths, unsupported = _list_folder(validation_folder, "data.validation_folder")
        validation, unreadable = _probe_all([_captioned(path, None, 1, cfg) for path in paths])
        skipped += unsupported + unreadable
        if not validation:
            raise _no_images(str(validation_folder), unsupported + unreadable, "data.validation_folder")
    else:
        items, validation = _hold_out(items, cfg.validation_fraction, seed)

    grid = BucketGrid.from_config(cfg)
    buckets = Counter(grid.assign(*item.size) for item in items)
    fallback = default_caption(cfg)
    uncaptioned = sum(1 for item in items if item.caption == fallback)
    return DatasetScan(items, validation, skipped, dict(buckets), uncaptioned)


def scan_class_images(folder: str | Path) -> list[Path]:
    """The readable images in a DreamBooth class folder, sorted; [] when the folder does not exist yet."""
    folder = Path(folder)
    if not folder.exists():
        return []
    paths, _ = _list_folder(folder, "dreambooth.class_folder")
    items, _ = _probe_all([Item(path, "") for path in paths])
    return [item.path for item in items]


# ---- sources ---------------------------------------------------------------------------------------------
def _list_folder(folder: Path, field_name: str, *,
                 exclude: Path | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under `folder` (sorted, hidden files and folders left out) and the unsupported ones found."""
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "folder not found"
        raise DataError(problem, f"set {field_name} to a folder of images", where=str(folder))
    excluded = exclude.resolve() if exclude is not None else None
    images, unsupported, visited = [], [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = Path(root).resolve()
        if real in visited or real == excluded:  # a symlink loop, or the validation folder inside the training one
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in files if not n.startswith(".")):
            path = Path(root, name)
            suffix = path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS and not _is_mask(path, files):
                images.append(path)
            elif suffix in _UNSUPPORTED_IMAGE_EXTENSIONS:
                unsupported.append((path, f"{suffix} images are not supported; convert it to PNG or JPEG"))
    return images, unsupported


def _is_mask(path: Path, siblings: list[str]) -> bool:
    """`photo.mask.png` is a mask when an image `photo.<ext>` is beside it."""
    stem = path.stem
    if not stem.lower().endswith(MASK_SUFFIX):
        return False
    image_stem = stem[:-len(MASK_SUFFIX)]
    return any(Path(name).stem == image_stem and Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in siblings)


def _read_manifest(manifest: Path, cfg: DataConfig) -> list[Item]:
    if not manifest.is_file():
        raise DataError("manifest file not found", "set data.manifest to a JSON-lines file", where=str(manifest))
    try:
        lines = manifest.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DataError("the manifest is not UTF-8 text", "re-save it as UTF-8", where=str(manifest)) from None
    items = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            items.append(_manifest_item(line, f"{manifest}:{number}", manifest.parent, cfg))
    return items


def _manifest_item(line: str, where: str, base: Path, cfg: DataConfig) -> Item:
    example = '{"image": "photo.png", "caption": "a photo of sks dog", "repeats": 2}'
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg})", f"write one object per line, e.g. {example}",
                        where=where) from None
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"].strip():
        raise DataError('each line needs an "image" path', f"e.g. {example}", where=where)
    unknown = sorted(set(entry) - set(MANIFEST_KEYS))
    if unknown:
        raise DataError(f"unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(MANIFEST_KEYS)}", where=where)
    caption = entry.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise DataError(f'"caption" must be text, got {caption!r}', "quote it", where=where)
    repeats = entry.get("repeats", cfg.repeats)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise DataError(f'"repeats" must be a whole number of at least 1, got {repeats!r}', "e.g. 1", where=where)
    return _captioned(base / Path(entry["image"]).expanduser(), caption, repeats, cfg)


def _captioned(path: Path, caption: str | None, repeats: int, cfg: DataConfig) -> Item:
    """An empty or missing caption falls back to the sidecar file, then to the default caption."""
    caption = " ".join(caption.split()) if caption else ""
    if not caption:
        caption = sidecar_caption(path, cfg.caption_extension) or default_caption(cfg)
    return Item(path=path, caption=caption, repeats=repeats)


# ---- checking ----------------------------------------------------------------------------------------------
def _probe_all(candidates: list[Item]) -> tuple[list[Item], list[tuple[Path, str]]]:
    """Open every image (in parallel: decoding releases the GIL); split into readable items and skipped files."""
    def probe(item: Item) -> tuple[int, int] | DataError:
        try:
            return probe_image(item.path)
        except DataError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(probe, candidates))
    items, skipped = [], []
    for item, result in zip(candidates, results):
        if isinstance(result, DataError):
            skipped.append((item.path, result.problem))
        else:
            item.size = result
            items.append(item)
    return items, skipped


def _hold_out(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Move `fraction` of the items (at least one, never all) to validation, chosen by `seed` alone."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(random.Random(seed).sample(range(len(items)), count))
    return ([item for n, item in enumerate(items) if n not in held],
            [item for n, item in enumerate(items) if n in held])


def _no_images(where: str, skipped: list[tuple[Path, str]], field_name: str) -> DataError:
    accepted = ", ".join(sorted(IMAGE_EXTENSIONS))
    if not skipped:
        return DataError("no images found", f"add image files ({accepted}) with optional .txt captions, "
                         f"or point {field_name} at another folder", where=where)
    reasons = "; ".join(f"{path.name}: {reason}" for path, reason in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return DataError(f"none of the {len(skipped)} image file(s) could be used ({reasons}{more})",
                     f"fix or replace them; accepted types: {accepted}", where=where)
