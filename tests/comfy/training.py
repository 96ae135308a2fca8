"""What the tests train on: the pack's sample images copied into a server's input folder, and the `advanced`
settings that keep a run tiny on a CPU (two sampling steps for sample images, no TensorBoard, no warm-up)."""

from __future__ import annotations

import shutil
from pathlib import Path

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "assets" / "sample_images"
TINY_RUN = "[output]\nsample_steps = 2\ntensorboard = false\n[train]\nwarmup_steps = 0\n"
"""A Train node's `advanced` for a tiny run."""


def sample_images_in(input_dir: Path, name: str, *, count: int = 4, captions: bool = True) -> Path:
    """The first `count` sample images (robot_01.png...), with their caption files unless `captions` is False, in
    the folder `name` of a server's input folder; returns that folder."""
    folder = input_dir / name
    folder.mkdir(exist_ok=True)
    for image in sorted(SAMPLE_IMAGES.glob("robot_*.png"))[:count]:
        shutil.copy(image, folder / image.name)
        caption = image.with_suffix(".txt")
        if captions and caption.exists():
            shutil.copy(caption, folder / caption.name)
    return folder
