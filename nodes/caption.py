"""BLIP Caption: captions for a training dataset from a BLIP model in models/blip (or the hub, when online)."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
from comfy_api.v0_0_2 import io

from ..trainers.captioning import HUB_MODELS, MODEL_FILES, BlipCaptioner, CaptionSettings, caption_images
from ..trainers.captioning import write_caption_files as write_beside_images
from ..trainers.errors import FinetuneError
from .access import allowed_folders, confine, data_roots, how_to_allow, inside
from .types import CAPTION_MODES, DatasetType, NodeError, TrainingImages, pixels_to_pil
from .validation import check_inputs

BLIP_FOLDER = "blip"

folder_paths.add_model_folder_path(BLIP_FOLDER, os.path.join(folder_paths.models_dir, BLIP_FOLDER))


def model_folders(folder_name: str) -> list[str]:
    """Subfolders (of every path registered for `folder_name`) that hold a transformers model (a config.json)."""
    found = []
    for root in folder_paths.get_folder_paths(folder_name):
        if os.path.isdir(root):
            found += sorted(name for name in os.listdir(root)
                            if os.path.isfile(os.path.join(root, name, "config.json")))
    return list(dict.fromkeys(found))


def model_folder_path(folder_name: str, name: str, input_name: str) -> Path:
    """The folder `name` picked in a combo of `model_folders(folder_name)`, or a NodeError saying where to put it."""
    roots = folder_paths.get_folder_paths(folder_name)
    for root in roots:
        candidate = confine(name, [Path(root), *allowed_folders()], input_name)
        if (candidate / "config.json").is_file():
            return candidate
    raise NodeError(f"`{input_name}`: there is no model folder {name!r} (with a config.json) in "
                    f"{' or '.join(roots)} — put the model's files into {Path(roots[0]) / name}, or pick another")


class BLIPCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = model_folders(BLIP_FOLDER) + list(HUB_MODELS)
        return io.Schema(
            node_id="FinetuneBLIPCaption",
            display_name="BLIP Caption",
            category="finetune/dataset",
            description="Writes a caption for each training image with BLIP. The model is a folder in models/blip "
                        "(config.json, weights, tokenizer and preprocessor files), or a hub id, downloaded once "
                        "when online.",
            inputs=[
                DatasetType.Input("dataset", tooltip="Training images from Load Training Images."),
                io.Combo.Input("model", options=choices, default=choices[0],
                               tooltip="A BLIP captioning model: a folder in models/blip, or a hub id (needs the "
                                       "internet the first time). 'large' writes better captions, 'base' is faster."),
                io.String.Input("prompt", default="a photo of",
                                tooltip="Text BLIP continues, so every caption starts with it. Empty: BLIP "
                                        "describes the image freely."),
                io.String.Input("trigger_word", default="",
                                tooltip="Put in front of every new caption (once), e.g. 'sks'. Empty: none."),
                io.String.Input("class_noun", default="",
                                tooltip="Put after the trigger word unless the caption already names it, e.g. 'dog'."),
                io.Combo.Input("mode", options=list(CAPTION_MODES), default="keep",
                               tooltip="keep: caption only images that have no caption yet; overwrite: replace "
                                       "every caption; append: add the new caption after the existing one."),
                io.Boolean.Input("write_caption_files", default=False,
                                 tooltip="Also save each changed caption as a .txt file beside its image (images "
                                         "from a folder only), replacing an existing .txt."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images captioned at once: faster, needs more memory."),
                io.Int.Input("max_length", default=40, min=1, max=200,
                             tooltip="Longest caption in tokens (about words) after the prompt."),
                io.Int.Input("num_beams", default=3, min=1, max=10,
                             tooltip="Beam search width: more gives more considered captions, 1 is fastest."),
            ],
            outputs=[
                DatasetType.Output("captioned_dataset", display_name="dataset",
                                   tooltip="The same images with the new captions; connect to a Train node."),
                io.String.Output("captions", display_name="captions", tooltip="Every image's caption, one line per image, in dataset order."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        # A model missing here (a workflow from another machine) ends as an error that says where to put it.
        return check_inputs(cls, inputs, later=("model",))

    @classmethod
    def execute(cls, dataset: TrainingImages, model: str, prompt: str, trigger_word: str, class_noun: str, mode: str,
                write_caption_files: bool, batch_size: int, max_length: int, num_beams: int) -> io.NodeOutput:
        settings = CaptionSettings(prompt=prompt.strip(), max_new_tokens=max_length, num_beams=num_beams,
                                   batch_size=batch_size, trigger_word=trigger_word, class_noun=class_noun)
        captioned = caption_dataset(dataset, model, settings, mode)
        if write_caption_files:
            save_caption_files(dataset, captioned)
        return io.NodeOutput(captioned, "\n".join(entry.caption for entry in captioned.entries))


def caption_dataset(dataset: TrainingImages, model: str, settings: CaptionSettings, mode: str) -> TrainingImages:
    """The dataset with new captions; in "keep" mode only the images without a caption are shown to BLIP."""
    todo = [n for n, entry in enumerate(dataset.entries) if mode != "keep" or not entry.caption]
    new = [""] * len(dataset.entries)
    for index, caption in zip(todo, caption_entries(dataset, todo, model, settings)):
        new[index] = caption
    return dataset.with_captions(new, mode)


def caption_entries(dataset: TrainingImages, indices: list[int], model: str, settings: CaptionSettings) -> list[str]:
    """Captions for the dataset's entries at `indices`, with ComfyUI's progress bar and Cancel between batches."""
    if not indices:
        return []
    import comfy.model_management as mm
    import comfy.utils
    import torch

    entries = [dataset.entries[index] for index in indices]
    images = [entry.path if entry.path is not None else pixels_to_pil(entry.pixels) for entry in entries]
    source = model if model in HUB_MODELS else model_folder_path(BLIP_FOLDER, model, "model")
    device = mm.get_torch_device()
    progress = comfy.utils.ProgressBar(len(images))

    def after_batch(done: int, total: int) -> None:
        progress.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    try:
        captioner = BlipCaptioner(source, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    except FinetuneError as exc:
        raise NodeError(f"`model`: {exc.where}: {exc.problem} — {blip_fix(model, exc.fix)}") from None
    try:
        mm.free_memory(captioner.parameter_bytes() * 2, device)
        captioner.to(device)
        return caption_images(captioner, images, settings, on_batch=after_batch)
    except FinetuneError as exc:
        raise NodeError(str(exc)) from None
    finally:
        captioner.close()
        mm.soft_empty_cache()


def blip_fix(model: str, fix: str) -> str:
    if model not in HUB_MODELS:
        return fix
    target = Path(folder_paths.get_folder_paths(BLIP_FOLDER)[0]) / model.split("/")[-1]
    return (f"download {model} ({MODEL_FILES}) into {target}, then pick '{target.name}' in `model` (refresh the "
            "page to list it)")


def save_caption_files(before: TrainingImages, after: TrainingImages) -> None:
    """Write the captions that changed beside their image files; images given as pixels have no place for one."""
    changed = {Path(new.path): new.caption for old, new in zip(before.entries, after.entries)
               if new.path is not None and new.caption != old.caption}
    roots = data_roots()
    outside = [path for path in changed if not inside(path, roots)]
    if outside:
        raise NodeError(f"`write_caption_files`: {outside[0].parent} is outside the folders the pack may write "
                          f"to ({', '.join(map(str, roots))}) — turn write_caption_files off, move the images into "
                          f"ComfyUI's input folder, {how_to_allow()}")
    try:
        write_beside_images(changed)
    except OSError as exc:
        raise NodeError(f"`write_caption_files`: cannot write a caption file ({exc}) — make the image folder "
                        "writable, or turn write_caption_files off") from None


NODES = [BLIPCaption]
