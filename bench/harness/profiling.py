"""Where our trainer's time goes: one run under cProfile, summed into the loop's phases."""

from __future__ import annotations

import io
import pstats
from pathlib import Path

from .report import table

# (label, file path ending, function name): cumulative time of each, in the order a step runs them
PHASES: tuple[tuple[str, str, str], ...] = (
    ("whole training (_train)", "trainers/loop.py", "_train"),
    ("load the base model", "trainers/models/loading.py", "load_base_model"),
    ("next batch (data)", "trainers/loop.py", "next"),
    ("loss: forward (compute_loss)", "trainers/methods/base.py", "compute_loss"),
    ("  VAE encode", "trainers/diffusion.py", "encode_latents"),
    ("  text encode", "trainers/models/families.py", "encode_prompts"),
    ("  UNet forward", "trainers/methods/base.py", "predict"),
    ("backward", "accelerate/accelerator.py", "backward"),
    ("clip grad norm", "accelerate/accelerator.py", "clip_grad_norm_"),
    ("optimizer step", "accelerate/optimizer.py", "step"),
    ("events (progress)", "trainers/events.py", "emit"),
    ("final checkpoint", "trainers/checkpointing.py", "save_checkpoint"),
    ("export", "trainers/methods/lora.py", "export"),
)


def cprofile_prefix(stats_file: Path) -> list[str]:
    """What goes before `-m trainers` to run it under cProfile."""
    return ["-m", "cProfile", "-o", str(stats_file)]


def summarize(stats_file: Path, steps: int, top: int = 12) -> str:
    """The phases' cumulative times (s/step = total / steps, so one-off work such as loading is spread over the
    steps) and the functions with the most self time."""
    stats = pstats.Stats(str(stats_file), stream=io.StringIO())
    entries = stats.stats  # (file, line, function) -> (calls, primitive calls, tottime, cumtime, callers)
    total = _cumulative(entries, *PHASES[0][1:]) or 1e-9
    whole = sum(value[2] for value in entries.values()) or 1e-9
    rows = [["the whole process (imports too)", f"{whole:.2f}", f"{whole / steps:.3f}", f"{100 * whole / total:.0f}%"]]
    for label, path_end, function in PHASES:
        seconds = _cumulative(entries, path_end, function)
        if seconds is None:
            continue
        rows.append([label, f"{seconds:.2f}", f"{seconds / steps:.3f}", f"{100 * seconds / total:.0f}%"])
    phases = table(["phase", "total s", "s/step", "of training"], rows)
    heaviest = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    self_rows = [[_name(key), f"{value[2]:.2f}", str(value[1]), f"{100 * value[2] / whole:.0f}%"]
                 for key, value in heaviest]
    functions = table(["function (self time)", "s", "calls", "of the process"], self_rows)
    return f"{phases}\n\n{functions}"


def _cumulative(entries: dict, path_end: str, function: str) -> float | None:
    times = [value[3] for (path, _, name), value in entries.items()
             if name == function and path.replace("\\", "/").endswith(path_end)]
    return max(times) if times else None


def _name(key: tuple[str, int, str]) -> str:
    path, line, function = key
    if path == "~":
        return function  # a builtin such as {built-in method torch.conv2d}
    parts = Path(path).parts
    return f"{'/'.join(parts[-2:])}:{line} {function}"
