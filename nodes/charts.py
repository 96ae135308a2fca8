"""The loss curve as an image: raw loss per step (thin), its moving average (bold), held-out loss (dots)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from ..trainers.runfolder import ProgressEvent, ValidationEvent

BACKGROUND = (24, 26, 31)
GRID = (58, 62, 72)
TEXT = (200, 204, 212)
RAW = (96, 140, 200)
SMOOTH = (255, 170, 60)
VALIDATION = (120, 220, 140)
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 72, 20, 36, 44


@dataclass
class LossHistory:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def from_events(cls, events: list[dict]) -> "LossHistory":
        """From the trainer's events; a resumed run repeats no step, a restarted one keeps only its last attempt."""
        history = cls()
        for event in events:
            if event.get("event") == ProgressEvent.EVENT and _finite(event.get("loss")):
                step = int(event["step"])
                while history.steps and history.steps[-1] >= step:  # a resume from an earlier checkpoint
                    for series in (history.steps, history.loss, history.smoothed):
                        series.pop()
                history.steps.append(step)
                history.loss.append(float(event["loss"]))
                avg = event.get("loss_avg")
                history.smoothed.append(float(avg) if _finite(avg) else float(event["loss"]))
            elif event.get("event") == ValidationEvent.EVENT and _finite(event.get("loss")):
                history.validation.append((int(event["step"]), float(event["loss"])))
        return history


def loss_chart(history: LossHistory, *, title: str = "", width: int = 768, height: int = 384) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    draw.text((MARGIN_LEFT, 10), title or "training loss", fill=TEXT, font=font)
    if not history.steps:
        draw.text((width // 2 - 60, height // 2), "no steps yet", fill=TEXT, font=font)
        return image
    values = history.loss + history.smoothed + [loss for _, loss in history.validation]
    low, high = _padded_range(min(values), max(values))
    first, last = min(history.steps), max(history.steps)
    span = max(last - first, 1)
    box = (MARGIN_LEFT, MARGIN_TOP, width - MARGIN_RIGHT, height - MARGIN_BOTTOM)

    def point(step: float, loss: float) -> tuple[float, float]:
        x = box[0] + (step - first) / span * (box[2] - box[0])
        y = box[3] - (loss - low) / (high - low) * (box[3] - box[1])
        return x, y

    for n in range(5):
        loss = low + (high - low) * n / 4
        y = point(first, loss)[1]
        draw.line((box[0], y, box[2], y), fill=GRID)
        draw.text((8, y - 7), f"{loss:.3g}", fill=TEXT, font=font)
    for step in _step_ticks(first, last):
        x = point(step, low)[0]
        draw.line((x, box[1], x, box[3]), fill=GRID)
        draw.text((x - 10, box[3] + 6), str(step), fill=TEXT, font=font)

    raw = [point(s, v) for s, v in zip(history.steps, history.loss)]
    smooth = [point(s, v) for s, v in zip(history.steps, history.smoothed)]
    if len(raw) > 1:
        draw.line(raw, fill=RAW, width=1)
        draw.line(smooth, fill=SMOOTH, width=3)
    else:
        _dot(draw, raw[0], RAW, 3)
    for step, loss in history.validation:
        _dot(draw, point(step, loss), VALIDATION, 4)
    legend = [("loss", RAW), ("average", SMOOTH)] + ([("held-out", VALIDATION)] if history.validation else [])
    x = box[2] - 90 * len(legend)
    for label, colour in legend:
        draw.line((x, 18, x + 18, 18), fill=colour, width=3)
        draw.text((x + 24, 10), label, fill=TEXT, font=font)
        x += 90
    last_text = f"step {history.steps[-1]}: loss {history.loss[-1]:.4f}, average {history.smoothed[-1]:.4f}"
    draw.text((MARGIN_LEFT, height - 18), last_text, fill=TEXT, font=font)
    return image


def _padded_range(low: float, high: float) -> tuple[float, float]:
    pad = (high - low) * 0.08 or max(abs(high) * 0.1, 1e-3)
    return (max(low - pad, 0.0) if low >= 0 else low - pad), high + pad


def _step_ticks(first: int, last: int, count: int = 6) -> list[int]:
    span = max(last - first, 1)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    stride = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.ceil(first / stride) * stride
    return list(range(int(start), last + 1, int(stride)))


def _dot(draw: ImageDraw.ImageDraw, at: tuple[float, float], colour: tuple[int, int, int], radius: int) -> None:
    draw.ellipse((at[0] - radius, at[1] - radius, at[0] + radius, at[1] + radius), fill=colour)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
