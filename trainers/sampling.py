"""Sample images during and after training: fixed prompts and seeds, so successive samples are comparable."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .io import atomic_path
from .levers import encoders_on_device
from .models.loading import BaseModel, build_pipeline
from .runfolder import RunFolder


class SamplingInterrupted(Exception):
    """A stop request arrived while images were being generated: nothing of the interrupted work was kept."""


@torch.no_grad()
def generate_images(base: BaseModel, prompts: list[str], *, steps: int, guidance: float, seed: int,
                    width: int, height: int, negative_prompt: str = "",
                    should_stop: Callable[[], bool] | None = None) -> list[Image.Image]:
    """One image per prompt. `should_stop` is asked after every denoising step: when it says yes the pipeline
    ends early and SamplingInterrupted is raised, so a stop never waits for a whole batch of samples."""
    with encoders_on_device(base):
        return _generate(base, prompts, steps=steps, guidance=guidance, seed=seed, width=width, height=height,
                         negative_prompt=negative_prompt, should_stop=should_stop)


def _generate(base: BaseModel, prompts: list[str], *, steps: int, guidance: float, seed: int, width: int, height: int,
              negative_prompt: str, should_stop: Callable[[], bool] | None) -> list[Image.Image]:
    pipeline = build_pipeline(base)
    pipeline.set_progress_bar_config(disable=True)
    device = base.unet.device
    images = []

    def check_stop(pipe, step, timestep, callback_kwargs):
        if should_stop is not None and should_stop():
            pipe._interrupt = True  # the documented way to end a diffusers pipeline's denoising loop early
        return callback_kwargs

    for n, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + n)
        result = pipeline(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                          guidance_scale=guidance, width=width, height=height, generator=generator,
                          output_type="pil", callback_on_step_end=check_stop)
        if should_stop is not None and should_stop():
            raise SamplingInterrupted()
        images.append(result.images[0])
    del pipeline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_samples(images: list[Image.Image], run: RunFolder, step: int) -> list[Path]:
    return [save_png(image, run.sample(step, n)) for n, image in enumerate(images)]
