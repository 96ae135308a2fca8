"""Captions for training images from BLIP (transformers' `BlipForConditionalGeneration`), batch by batch.

A model is a local folder (config.json, weights, preprocessor and tokenizer files) or a hub id such as
`Salesforce/blip-image-captioning-base` (downloaded once, when online). With a prompt ("a photo of") BLIP continues
that text, so the caption starts with it; the trigger word and class noun then go in front as the trainer puts them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .data.captions import with_trigger
from .data.images import load_image
from .errors import ConfigError, ModelError
from .io import atomic_write_text

HUB_MODELS = ("Salesforce/blip-image-captioning-base", "Salesforce/blip-image-captioning-large")
MODEL_FILES = "config.json, model.safetensors, preprocessor_config.json and the tokenizer files"

ImageSource = Image.Image | str | Path
"""An image, or the path of one (read when its batch comes up)."""


@dataclass(frozen=True)
class CaptionSettings:
    prompt: str = "a photo of"
    """Text BLIP continues (conditional captioning); empty for an unconditional caption."""
    max_new_tokens: int = 40
    """Longest caption, in tokens (words and word pieces) after the prompt."""
    num_beams: int = 3
    """Beam search width; 1 is greedy and fastest."""
    batch_size: int = 8
    trigger_word: str = ""
    class_noun: str = ""

    def validate(self) -> None:
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, name)}", f"set {name} to 1 or more",
                                  where=name)


class BlipCaptioner:
    """A loaded BLIP model and its processor. Use as a context manager (or call `close`) to free its memory."""

    def __init__(self, source: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        local = Path(source).expanduser()
        is_folder = local.is_dir()
        if not is_folder and str(source) not in HUB_MODELS:
            raise ModelError("is neither a model folder nor a known BLIP model id",
                             f"give a folder holding {MODEL_FILES}, or one of: {', '.join(HUB_MODELS)}",
                             where=str(source))
        where = str(local if is_folder else source)
        try:
            self.processor = BlipProcessor.from_pretrained(where, local_files_only=is_folder)
            self.model = BlipForConditionalGeneration.from_pretrained(where, local_files_only=is_folder, dtype=dtype)
        except OSError as exc:
            if is_folder:
                raise ModelError(f"not a complete BLIP model folder ({_first_line(exc)})",
                                 f"the folder needs {MODEL_FILES}", where=where) from None
            raise ModelError("the BLIP model is not downloaded and the model hub cannot be reached",
                             f"download {source} ({MODEL_FILES}) into a folder and give that folder instead",
                             where=where) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"not a BLIP captioning model ({_first_line(exc)})",
                             f"use {HUB_MODELS[0]} or {HUB_MODELS[1]}, or a folder with one of them",
                             where=where) from None
        self.device = torch.device(device)
        self.dtype = dtype
        self.model.to(self.device).eval()

    def to(self, device: torch.device | str) -> "BlipCaptioner":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def caption_batch(self, images: Sequence[Image.Image], settings: CaptionSettings) -> list[str]:
        """BLIP's text for each image, with the prompt it continued, as one line each."""
        text = [settings.prompt] * len(images) if settings.prompt.strip() else None
        inputs = self.processor(images=[image.convert("RGB") for image in images], text=text, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        tokens = self.model.generate(**inputs, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams)
        return [" ".join(caption.split()) for caption in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    def close(self) -> None:
        """Drop the model and hand its memory back (on a GPU too)."""
        if getattr(self, "model", None) is None:
            return
        self.model.to("cpu")
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "BlipCaptioner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def caption_images(captioner: BlipCaptioner, images: Sequence[ImageSource],
                   settings: CaptionSettings = CaptionSettings(), *,
                   on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    """One caption per image, in order: BLIP's text with the trigger word (and class noun) in front.
    `on_batch(done, total)` runs after every batch; raising from it stops the work there."""
    settings.validate()
    captions: list[str] = []
    for start in range(0, len(images), settings.batch_size):
        batch = [_as_image(item) for item in images[start:start + settings.batch_size]]
        for generated in captioner.caption_batch(batch, settings):
            captions.append(with_trigger(generated, settings.trigger_word.strip(), settings.class_noun.strip()))
        if on_batch is not None:
            on_batch(len(captions), len(images))
    return captions


def write_caption_files(captions: dict[Path, str], extension: str = ".txt") -> list[Path]:
    """Write each image's caption beside it (`photo.png` -> `photo.txt`), atomically; returns the files written."""
    written = []
    for image_path, caption in captions.items():
        target = Path(image_path).with_suffix(extension)
        atomic_write_text(target, caption + "\n")
        written.append(target)
    return written


def _as_image(item: ImageSource) -> Image.Image:
    return item if isinstance(item, Image.Image) else load_image(item)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
