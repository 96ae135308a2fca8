"""Sample images during and after training: fixed prompts and seeds, so successive samples are comparable."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .io import atomic_path
from .models.loading import BaseModel, build_pipeline


@torch.no_grad()
def generate_images(base: BaseModel, prompts: list[str], *, steps: int, guidance: float, seed: int,
                    width: int, height: int, negative_prompt: str = "") -> list[Image.Image]:
    pipeline = build_pipeline(base)
    pipeline.set_progress_bar_config(disable=True)
    device = base.unet.device
    images = []
    for n, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + n)
        result = pipeline(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                          guidance_scale=guidance, width=width, height=height, generator=generator,
                          output_type="pil")
        images.append(result.images[0])
    del pipeline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_samples(images: list[Image.Image], folder: Path, step: int) -> list[Path]:
    return [save_png(image, folder / f"step_{step:06d}_{n}.png") for n, image in enumerate(images)]
