"""DreamBooth prior preservation: class images (given, or generated once by the base model and reused)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from .config import Config, fill_template
from .data.dataset import Item, TrainingDataset, scan_class_images
from .errors import DataError
from .models.loading import BaseModel
from .sampling import generate_images, save_png


def class_prompt(cfg: Config) -> str:
    return fill_template(cfg.dreambooth.class_prompt, "", cfg.data.class_noun)


def instance_prompt(cfg: Config) -> str:
    return fill_template(cfg.dreambooth.instance_prompt, cfg.data.trigger_word, cfg.data.class_noun)


def class_image_cache(cfg: Config, base: BaseModel, cache_root: Path) -> Path:
    """Generated class images depend on the base model, the prompt and the resolution: one folder per combination."""
    key = "|".join([str(base.source), class_prompt(cfg), str(cfg.data.resolution), base.family.name,
                    str(cfg.dreambooth.class_generation_steps)])
    return cache_root / hashlib.sha1(key.encode()).hexdigest()[:16]


def ensure_class_images(cfg: Config, base: BaseModel, cache_root: Path, *, on_progress=None) -> list[Path]:
    db = cfg.dreambooth
    given: list[Path] = []
    if db.class_folder:
        folder = Path(db.class_folder)
        if not folder.is_dir():
            raise DataError("the class image folder does not exist", "fix dreambooth.class_folder or leave it empty "
                            "to generate class images with the base model", where=str(folder))
        given = scan_class_images(folder)
    if len(given) >= db.num_class_images:
        return given[: db.num_class_images]
    folder = class_image_cache(cfg, base, cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    cached = sorted(folder.glob("class_*.png"))
    needed = db.num_class_images - len(given)
    prompt = class_prompt(cfg)
    size = cfg.data.resolution
    for n in range(len(cached), needed):
        image = generate_images(base, [prompt], steps=db.class_generation_steps, guidance=cfg.output.sample_guidance,
                                seed=cfg.train.seed + 100_000 + n, width=size, height=size)[0]
        cached.append(save_png(image, folder / f"class_{n:05d}.png"))
        if on_progress:
            on_progress(n + 1, needed)
    return given + cached[:needed]


def class_dataset(cfg: Config, paths: list[Path]) -> TrainingDataset:
    """Class images all carry the class prompt; no trigger word, no caption dropout or shuffling."""
    data = dataclasses.replace(cfg.data, trigger_word="", class_noun="", caption_dropout=0.0, shuffle_tags=False,
                               folder="", manifest="")
    items = [Item(path=p, caption=class_prompt(cfg), repeats=1) for p in paths]
    return TrainingDataset(items, data, seed=cfg.train.seed + 1)
