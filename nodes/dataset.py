"""Load Training Images: a folder (or an IMAGE batch) becomes a dataset, scanned exactly as the CLI scans it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import folder_paths
from comfy_api.v0_0_2 import io

from ..trainers.config import Config
from ..trainers.data.images import MIN_SIDE, load_image
from ..trainers.data.scan import scan_dataset
from ..trainers.errors import FinetuneError
from .access import ALLOW_FOLDERS_ENV, confine_data
from .types import DatasetType, Entry, NodeError, TrainingImages, image_batch, node_error, pixels_to_pil
from .validation import check_inputs

NO_FOLDER = "(none)"
PREVIEW_LIMIT = 64
PREVIEW_SIDE = 256
FINGERPRINT_LIMIT = 100_000
"""Entries the change check looks at; a folder with more is read again only when its first ones change."""
DATA_INPUTS = {"data.folder": "path", "data.repeats": "repeats", "data.resolution": "resolution", "data.crop": "crop",
               "data.flip": "flip", "data.buckets": "bucketing"}


class LoadTrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        folders = folder_paths.get_input_subfolders()
        return io.Schema(
            node_id="FinetuneLoadTrainingImages",
            display_name="Load Training Images",
            category="finetune/dataset",
            description="Images and their captions for training: a folder with optional .txt captions beside each "
                        "image, or an IMAGE batch. Every image is checked now, so a broken file is reported here.",
            inputs=[
                io.Combo.Input("folder", options=[NO_FOLDER, *folders], default=folders[0] if folders else NO_FOLDER,
                               tooltip="A subfolder of ComfyUI's input folder. Images in its subfolders are included; "
                                       "a caption is read from a .txt file of the same name."),
                io.String.Input("path", default="", placeholder="e.g. my_dog or my_dog/best",
                                tooltip="A folder typed in instead, used instead of `folder` when set: relative to "
                                        "ComfyUI's input folder, or absolute inside it (a symlink placed there "
                                        "works). Folders elsewhere only where the person running ComfyUI allows "
                                        f"them ({ALLOW_FOLDERS_ENV} or user/comfyui-finetune/access.toml)."),
                io.Int.Input("repeats", default=1, min=1, max=1000,
                             tooltip="How often each image is seen per epoch (raise it for a small set of images)."),
                io.Int.Input("resolution", default=512, min=32, max=4096, step=32,
                             tooltip="Training side length in pixels: 512 for SD1.x, 768 for SD2.x, 1024 for SDXL."),
                io.Combo.Input("crop", options=["center", "random"], default="center",
                               tooltip="How an image is cut to its training size: from the centre, or at a random "
                                       "spot each time (more variety, may cut off the subject)."),
                io.Boolean.Input("flip", default=False,
                                 tooltip="Also train on mirror images (doubles the variety; avoid for text or "
                                         "asymmetric subjects)."),
                io.Boolean.Input("bucketing", default=True,
                                 tooltip="Keep each image's aspect ratio by grouping similar shapes, instead of "
                                         "cropping everything square."),
                io.Image.Input("images", optional=True,
                               tooltip="Train on these images instead of a folder (e.g. from Load Image)."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                tooltip="Captions for the `images` input: one line per image, or a single line for "
                                        "all of them. Ignored for a folder (use .txt files there)."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Loss masks for the `images` input (one, or one per image, at the images' "
                                      "size): only where the mask is 1 is learned, so the background is not. From "
                                      "a segmentation node, or Load Image's mask (the mask editor's painted area; "
                                      "Invert Mask to learn the rest). For a folder, put photo.mask.png beside "
                                      "photo.jpg and set [data] masked_loss = true in `advanced`."),
            ],
            outputs=[
                DatasetType.Output("dataset", display_name="dataset",
                                   tooltip="The training images with their captions and options; connect to a "
                                           "caption node or a Train node."),
                io.Image.Output("preview", display_name="preview",
                                tooltip=f"The first {PREVIEW_LIMIT} images, cropped square to one size for viewing."),
                io.String.Output("report", display_name="report",
                                 tooltip="How many images were found, their captions and sizes, and every skipped "
                                         "file with the reason."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        # `folder` is checked against the folders there are now (one made after the page loaded counts), unless
        # `path` takes its place.
        folder = inputs.get("folder", NO_FOLDER)
        if folder != NO_FOLDER and not str(inputs.get("path", "")).strip() \
                and folder not in folder_paths.get_input_subfolders():
            return (f"the folder {folder!r} is not a subfolder of ComfyUI's input folder — put your images into "
                    f"input/{folder} and refresh the page (R), or pick another")
        return check_inputs(cls, inputs, later=("folder",))

    @classmethod
    def fingerprint_inputs(cls, folder: str = NO_FOLDER, path: str = "", **kwargs) -> str:
        """Changes when a file in the folder is added, removed or edited, so the images are read again."""
        try:
            root = resolve_folder(folder, path)
        except NodeError:
            return ""
        return folder_fingerprint(root)

    @classmethod
    def execute(cls, folder: str, path: str, repeats: int, resolution: int, crop: str, flip: bool, bucketing: bool,
                images=None, captions: str = "", masks=None) -> io.NodeOutput:
        options = {"resolution": resolution, "crop": crop, "flip": flip, "buckets": bucketing}
        check_options(repeats, options)
        if masks is not None and images is None:
            raise NodeError("`masks` needs the `images` input — connect the images the masks belong to, or for a "
                            "folder put photo.mask.png beside each photo and set [data] masked_loss = true in the "
                            "Train node's `advanced`")
        if images is not None:
            dataset = from_image_batch(images, captions, repeats, options, masks)
            report = f"{len(dataset.entries)} image(s) from the `images` input, " \
                     f"{sum(1 for e in dataset.entries if e.caption)} with a caption"
        else:
            dataset, report = from_folder(resolve_folder(folder, path), repeats, options)
        preview = image_batch(preview_images(dataset), (min(resolution, PREVIEW_SIDE),) * 2)
        if len(dataset.entries) > PREVIEW_LIMIT:
            report += f"\n(the preview shows the first {PREVIEW_LIMIT})"
        return io.NodeOutput(dataset, preview, report)


def resolve_folder(folder: str, path: str) -> Path:
    text = path.strip() or ("" if folder == NO_FOLDER else folder)
    if not text:
        raise NodeError("no images given — choose a `folder`, type a `path`, or connect the `images` input")
    candidate = confine_data(text, "path" if path.strip() else "folder")
    if not candidate.is_dir():
        problem = "is a file, not a folder" if candidate.exists() else "does not exist"
        raise NodeError(f"the image folder {candidate} {problem} — fix `path` (absolute, or relative to ComfyUI's "
                        "input folder) or choose another `folder`")
    return candidate


def folder_fingerprint(root: Path, limit: int = FINGERPRINT_LIMIT) -> str:
    """Size and time of every file under `root`, each real folder visited once (two links to `.` would loop
    forever otherwise) and at most `limit` entries: this runs on ComfyUI's execution thread, where /interrupt
    cannot reach, so it must end."""
    digest, visited, seen = hashlib.sha256(str(root).encode()), set(), 0
    for current, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in visited or seen > limit:
            dirs[:] = []
            continue
        visited.add(real)
        dirs.sort()
        seen += len(dirs) + len(files)
        for name in sorted(files):
            try:
                stat = os.stat(os.path.join(current, name))
            except OSError:
                continue
            digest.update(f"{current}/{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def check_options(repeats: int, options: dict) -> None:
    """The dataset's values, checked by the trainer's own rules (a placeholder model: none is chosen here)."""
    data = {"folder": "-", "repeats": repeats, **options}
    try:
        Config.from_dict({"model": {"base": "-"}, "data": data}).validate()
    except FinetuneError as exc:
        raise node_error(exc, DATA_INPUTS) from None


def from_folder(root: Path, repeats: int, options: dict) -> tuple[TrainingImages, str]:
    try:
        scan = scan_dataset(Config.from_dict({"data": {"folder": str(root), "repeats": repeats, **options}}).data)
    except FinetuneError as exc:
        raise node_error(exc, DATA_INPUTS) from None
    entries = tuple(Entry(caption=item.caption, path=str(item.path), repeats=item.repeats) for item in scan.items)
    skipped = tuple((str(path), reason) for path, reason in scan.skipped)
    return TrainingImages(entries, str(root), options, skipped), f"{root}\n{scan.report()}"


def from_image_batch(images, captions: str, repeats: int, options: dict, masks=None) -> TrainingImages:
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    if min(height, width) < MIN_SIDE:
        raise NodeError(f"the `images` input is {width}×{height}; both sides must be at least {MIN_SIDE} px — "
                        "connect larger images")
    lines = [" ".join(line.split()) for line in (captions or "").splitlines() if line.strip()]
    if len(lines) not in (0, 1, count):
        raise NodeError(f"`captions` has {len(lines)} lines for {count} images — write one line per image, "
                        "a single line for all, or nothing")
    texts = lines * count if len(lines) == 1 else lines or [""] * count
    per_image = image_masks(masks, count, (height, width))
    entries = tuple(Entry(caption=text, pixels=images[n].detach().cpu().clone(), repeats=repeats, mask=per_image[n])
                    for n, text in enumerate(texts))
    if masks is not None:
        options = {**options, "masked_loss": True}
    return TrainingImages(entries, "images input", options)


def image_masks(masks, count: int, size: tuple[int, int]) -> list:
    """One (H, W) mask per image, or None each without masks; a single mask serves every image."""
    if masks is None:
        return [None] * count
    masks = masks if masks.ndim == 3 else masks[None]
    if masks.shape[0] not in (1, count) or tuple(masks.shape[1:]) != size:
        raise NodeError(f"`masks` is {masks.shape[0]} mask(s) of {masks.shape[2]}×{masks.shape[1]} for {count} "
                        f"image(s) of {size[1]}×{size[0]} — connect one mask, or one per image, at the images' size")
    return [masks[n if masks.shape[0] == count else 0].detach().cpu().clone() for n in range(count)]


def preview_images(dataset: TrainingImages) -> list:
    side = PREVIEW_SIDE * 2
    return [load_image(entry.path, at_least=(side, side)) if entry.path is not None else pixels_to_pil(entry.pixels)
            for entry in dataset.entries[:PREVIEW_LIMIT]]


NODES = [LoadTrainingImages]
