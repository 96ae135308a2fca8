"""Draw the bundled sample training images (a toy robot in varied poses, colours, backgrounds and sizes) and the
pack's icon, from shapes alone, so they carry no licence but ours.

    python scripts/make_sample_images.py      # rewrites assets/sample_images/ and web/icon.png

Deterministic: the same files every run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "sample_images"
ICON = REPO / "web" / "icon.png"
SUPERSAMPLE = 2
SUBJECT = "sks toy robot"

BODY_COLOURS = {"red": (214, 64, 52), "teal": (32, 150, 150), "yellow": (236, 186, 40), "purple": (128, 78, 186),
                "orange": (240, 128, 36), "blue": (52, 102, 214), "green": (72, 164, 84)}
BACKGROUNDS = {  # name: (top colour, bottom colour, pattern)
    "sky": ((150, 200, 240), (236, 244, 250), "plain"),
    "sunset": ((250, 170, 110), (120, 80, 140), "plain"),
    "mint": ((206, 240, 222), (150, 204, 180), "dots"),
    "studio": ((70, 72, 80), (24, 24, 30), "plain"),
    "sand": ((246, 226, 190), (214, 184, 140), "stripes"),
    "lilac": ((226, 214, 246), (190, 170, 226), "checks"),
}


@dataclass
class Pose:
    colour: str
    background: str
    index: int  # position in the sample set (names the file)
    scale: float  # robot height / image height
    centre_x: float  # 0..1
    head_tilt: float  # degrees
    left_arm: float  # degrees from hanging down, positive = raised outwards
    right_arm: float
    stride: float  # leg spread in body widths
    pose_name: str


def background(width: int, height: int, name: str) -> Image.Image:
    top, bottom, pattern = BACKGROUNDS[name]
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (np.array(top)[None, None, :] * (1 - t) + np.array(bottom)[None, None, :] * t).repeat(width, axis=1)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    tint = tuple(int(c * 0.9) for c in bottom)
    step = max(width, height) // 10
    if pattern == "stripes":
        for x in range(-height, width, step):
            draw.line([(x, height), (x + height, 0)], fill=tint, width=step // 4)
    elif pattern == "dots":
        for y in range(step // 2, height, step):
            for x in range(step // 2 + (y // step % 2) * step // 2, width, step):
                draw.ellipse([x - step // 8, y - step // 8, x + step // 8, y + step // 8], fill=tint)
    elif pattern == "checks":
        for y in range(0, height, step):
            for x in range((y // step % 2) * step, width, 2 * step):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=tint)
    return image


def shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)


def draw_limb(draw: ImageDraw.ImageDraw, start: tuple[float, float], angle_deg: float, length: float,
              width: float, colour: tuple[int, int, int], hand: tuple[int, int, int]) -> None:
    angle = math.radians(angle_deg)
    end = (start[0] + math.sin(angle) * length, start[1] + math.cos(angle) * length)
    draw.line([start, end], fill=colour, width=int(width))
    r = width * 0.8
    draw.ellipse([end[0] - r, end[1] - r, end[0] + r, end[1] + r], fill=hand)


def draw_head(unit: float, body: tuple[int, int, int], tilt: float) -> Image.Image:
    """The head on its own transparent layer, so it can tilt; centred on the neck."""
    side = int(unit * 6)
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cx, cy = side / 2, side / 2
    w, h = unit * 2.6, unit * 2.0
    top = cy - h - unit * 0.2
    draw.line([(cx, top), (cx, top - unit * 0.9)], fill=shade(body, 0.6), width=int(unit * 0.18))
    draw.ellipse([cx - unit * 0.3, top - unit * 1.3, cx + unit * 0.3, top - unit * 0.7], fill=(250, 80, 80))
    draw.rounded_rectangle([cx - w / 2, top, cx + w / 2, top + h], radius=unit * 0.5, fill=shade(body, 1.1))
    visor = [cx - w * 0.38, top + h * 0.22, cx + w * 0.38, top + h * 0.68]
    draw.rounded_rectangle(visor, radius=unit * 0.3, fill=(34, 38, 48))
    for side_sign in (-1, 1):
        ex, ey = cx + side_sign * w * 0.18, top + h * 0.45
        r = unit * 0.28
        draw.ellipse([ex - r, ey - r, ex + r, ey + r], fill=(120, 230, 255))
        draw.ellipse([ex - r * 0.4, ey - r * 0.4, ex + r * 0.4, ey + r * 0.4], fill=(255, 255, 255))
    draw.rectangle([cx - unit * 0.35, top + h, cx + unit * 0.35, cy + unit * 0.1], fill=shade(body, 0.6))
    return layer.rotate(tilt, resample=Image.BICUBIC, center=(cx, cy))


def draw_robot(canvas: Image.Image, pose: Pose) -> None:
    width, height = canvas.size
    body = BODY_COLOURS[pose.colour]
    unit = pose.scale * height / 10.0  # the robot is ~10 units tall
    cx = pose.centre_x * width
    feet_y = height * 0.93
    hip_y = feet_y - unit * 2.2
    neck_y = hip_y - unit * 3.6
    draw = ImageDraw.Draw(canvas)
    draw.ellipse([cx - unit * 2.4, feet_y - unit * 0.35, cx + unit * 2.4, feet_y + unit * 0.35],
                 fill=shade(canvas.getpixel((int(cx), int(min(height - 1, feet_y))))[:3], 0.7))
    leg_w = unit * 0.8
    for side_sign in (-1, 1):
        x = cx + side_sign * unit * (0.6 + pose.stride * 0.5)
        draw.rounded_rectangle([x - leg_w / 2, hip_y, x + leg_w / 2, feet_y - unit * 0.3], radius=unit * 0.2,
                               fill=shade(body, 0.7))
        draw.rounded_rectangle([x - leg_w * 0.8, feet_y - unit * 0.5, x + leg_w * 0.8, feet_y], radius=unit * 0.2,
                               fill=(60, 60, 70))
    shoulder_y = neck_y + unit * 0.6
    for side_sign, angle in ((-1, -pose.left_arm), (1, pose.right_arm)):
        draw_limb(draw, (cx + side_sign * unit * 1.5, shoulder_y), angle, unit * 2.4, unit * 0.5,
                  shade(body, 0.75), (70, 70, 80))
    draw.rounded_rectangle([cx - unit * 1.6, neck_y, cx + unit * 1.6, hip_y], radius=unit * 0.5, fill=body)
    draw.rounded_rectangle([cx - unit * 1.0, neck_y + unit * 0.8, cx + unit * 1.0, neck_y + unit * 2.4],
                           radius=unit * 0.3, fill=shade(body, 1.25))
    for i, light in enumerate(((255, 220, 60), (90, 220, 120), (250, 90, 90))):
        lx, ly, r = cx - unit * 0.55 + i * unit * 0.55, neck_y + unit * 1.6, unit * 0.2
        draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=light)
    head = draw_head(unit, body, pose.head_tilt)
    canvas.paste(head, (int(cx - head.width / 2), int(neck_y - head.height / 2)), head)


def render(pose: Pose, size: tuple[int, int]) -> Image.Image:
    big = (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE)
    canvas = background(*big, pose.background)
    draw_robot(canvas, pose)
    return canvas.resize(size, Image.LANCZOS)


def caption(pose: Pose) -> str:
    return f"a photo of {SUBJECT}, {pose.colour}, {pose.pose_name}, {pose.background} background"


POSES = {  # pose name: (head tilt, left arm, right arm, stride)
    "standing": (0, 10, 10, 0.2),
    "waving": (-8, 15, 150, 0.3),
    "arms up": (0, 160, 160, 0.5),
    "walking": (5, -30, 40, 0.9),
    "pointing": (10, 20, 95, 0.4),
    "head tilted": (18, 25, 25, 0.2),
}
SIZES = [(512, 512)] * 10 + [(384, 512), (384, 512), (512, 384)]


def sample_poses(seed: int = 7) -> list[tuple[Pose, tuple[int, int]]]:
    rng = random.Random(seed)
    colours, backgrounds, pose_names = list(BODY_COLOURS), list(BACKGROUNDS), list(POSES)
    plans = []
    for i, size in enumerate(SIZES):
        tilt, left, right, stride = POSES[pose_names[i % len(pose_names)]]
        plans.append((Pose(colour=colours[i % len(colours)], background=backgrounds[(i * 5) % len(backgrounds)],
                           index=i, scale=rng.uniform(0.5, 0.85), centre_x=rng.uniform(0.35, 0.65),
                           head_tilt=tilt + rng.uniform(-4, 4), left_arm=left + rng.uniform(-10, 10),
                           right_arm=right + rng.uniform(-10, 10), stride=stride,
                           pose_name=pose_names[i % len(pose_names)]), size))
    return plans


def write_samples(folder: Path = SAMPLES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for pose, size in sample_poses():
        path = folder / f"robot_{pose.index + 1:02d}.png"
        render(pose, size).save(path, optimize=True)
        if pose.index % 2 == 0:  # captions for half; the rest get the training's default caption
            path.with_suffix(".txt").write_text(caption(pose) + "\n", encoding="utf-8")
        written.append(path)
    return written


def write_icon(path: Path = ICON, side: int = 256) -> None:
    big = side * SUPERSAMPLE
    canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    badge = background(big, big, "studio").convert("RGBA")
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, big - 1, big - 1], radius=big // 6, fill=255)
    canvas.paste(badge, (0, 0), mask)
    robot = Pose("teal", "studio", 0, scale=0.8, centre_x=0.5, head_tilt=-6, left_arm=20, right_arm=150,
                 stride=0.3, pose_name="waving")
    draw_robot(canvas, robot)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.resize((side, side), Image.LANCZOS).save(path, optimize=True)


if __name__ == "__main__":
    for written in write_samples():
        print(written.relative_to(REPO))
    write_icon()
    print(ICON.relative_to(REPO))
