"""The synthetic world the drawing base is trained on, and the picture metrics that read it.

A scene is one coloured square filling one quarter of a 32 x 32 picture on a black background:

    "a red square upper left on black"

- colours: red, green, blue, yellow (the base's); every colour is pure (each RGB channel 0 or 255), the only
  colours the hand-built VAE of `scripts/drawing_base.py` reproduces exactly;
- places: the four quarters (upper left, upper right, lower left, lower right); one quarter is 16 x 16 pixels,
  2 x 2 latent cells;
- background: black (a second background colour made the base need several times the training to draw the
  named colour in the named quarter reliably).

The subject the fine-tunes learn is a combination the base never saw: a yellow square lower right (the base is
trained on every other colour and place, yellow included, but never yellow in that quarter).

The metrics read pictures ComfyUI generated and saved (PNG files):
- `dominant_colour(image, place)`: every pixel is snapped to the nearest of the eight pure colours; the colour
  most pixels of that quarter snap to. A picture *draws* a scene when the scene's colour dominates its quarter.
- `distance(a, b)`: mean absolute difference of two pictures' pixels, 0..1 (the drift of a prompt's pictures).
- `edge_map(image)` / `edge_agreement(image, edges)`: where neighbouring pixels change colour; the share of a
  control map's edge pixels that the picture also has an edge on (within one pixel), 0..1.
- `jpeg_size(image)`: bytes of the picture (at its own size) saved as JPEG at quality 95, what DDPO's
  compressibility reward lowers.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
"""Picture side in pixels (the latent is a quarter of it at SD's factor 8: 4 x 4)."""
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
BACKGROUNDS = {"black": (0, 0, 0)}
PLACES = {"upper left": (0, 0), "upper right": (0, 1), "lower left": (1, 0), "lower right": (1, 1)}
PURE = {**COLOURS, **BACKGROUNDS, "white": (255, 255, 255), "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
"""Every colour the metric tells apart: all eight corners of the RGB cube."""


@dataclass(frozen=True)
class Scene:
    colour: str
    place: str
    background: str = "black"

    @property
    def caption(self) -> str:
        return f"a {self.colour} square {self.place} on {self.background}"

    def render(self) -> Image.Image:
        pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        pixels[:] = BACKGROUNDS[self.background]
        pixels[_quarter(self.place)] = COLOURS[self.colour]
        return Image.fromarray(pixels)


SUBJECT = Scene("yellow", "lower right", "black")
"""What the fine-tunes learn: a colour and a place the base knows, in a combination it never saw."""


def square_picture(colour: str, top: int, left: int, side: int = SIZE // 2) -> Image.Image:
    """A square of `colour` anywhere on black (the base draws squares in the quarters only): ControlNet's world."""
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[top:top + side, left:left + side] = COLOURS[colour]
    return Image.fromarray(pixels)


CONTROL_OFFSETS = (0, 8, 16)
"""Where ControlNet's training squares sit (rows and columns, on the VAE's 8-pixel grid): the four quarters and
the five places between them."""


def control_pictures() -> list[tuple[Image.Image, str]]:
    """ControlNet's training pictures with their captions, which name the colour but not the place: the place is
    the control map's to give."""
    return [(square_picture(colour, top, left), f"a {colour} square on black")
            for colour in COLOURS for top in CONTROL_OFFSETS for left in CONTROL_OFFSETS]


def base_scenes() -> list[Scene]:
    """Every scene the base is trained on: all colours x places but the subject's colour and place (15)."""
    return [Scene(c, p, b) for c, p, b in itertools.product(COLOURS, PLACES, BACKGROUNDS)
            if (c, p) != (SUBJECT.colour, SUBJECT.place)]


def _quarter(place: str) -> tuple[slice, slice]:
    row, column = PLACES[place]
    half = SIZE // 2
    return slice(row * half, (row + 1) * half), slice(column * half, (column + 1) * half)


def _pixels(image: Image.Image | Path | str, *, world_size: bool = True) -> np.ndarray:
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    if world_size and image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def snap(image: Image.Image | Path | str) -> np.ndarray:
    """Each pixel's nearest pure colour, as an index into `PURE` (H x W)."""
    palette = np.array(list(PURE.values()), dtype=np.float32)
    pixels = _pixels(image)
    return np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1).argmin(-1)


def dominant_colour(image: Image.Image | Path | str, place: str) -> str:
    counts = Counter(snap(image)[_quarter(place)].ravel().tolist())
    return list(PURE)[counts.most_common(1)[0][0]]


def draws(image: Image.Image | Path | str, scene: Scene) -> bool:
    return dominant_colour(image, scene.place) == scene.colour


def hit_rate(images: list, scene: Scene) -> float:
    return sum(draws(image, scene) for image in images) / len(images)


def distance(a: Image.Image | Path | str, b: Image.Image | Path | str) -> float:
    return float(np.abs(_pixels(a) - _pixels(b)).mean() / 255.0)


def edge_map(image: Image.Image | Path | str) -> np.ndarray:
    """True where a pixel's pure colour differs from its right or lower neighbour's."""
    colours = snap(image)
    edges = np.zeros(colours.shape, dtype=bool)
    edges[:, :-1] |= colours[:, :-1] != colours[:, 1:]
    edges[:-1, :] |= colours[:-1, :] != colours[1:, :]
    return edges


def edge_agreement(image: Image.Image | Path | str, edges: np.ndarray) -> float:
    """Share of the map's edge pixels with an edge of the picture within one pixel (0 when the map has none)."""
    if not edges.any():
        return 0.0
    found = edge_map(image)
    near = found.copy()
    for axis in (0, 1):
        for shift in (-1, 1):
            near |= np.roll(found, shift, axis=axis)
    return float(near[edges].mean())


def jpeg_size(image: Image.Image | Path | str, quality: int = 95) -> int:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(image, world_size=False).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()
