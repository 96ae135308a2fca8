"""Resumable checkpoints: trainable weights, optimizer, LR scheduler, noise RNG and position in the data.

Layout: `<run>/checkpoints/step_000123/` with `trainable.safetensors`, `extra.safetensors`, `optimizer.pt`,
`scheduler.pt`, `rng.pt` and `state.json`. A checkpoint folder is written under a temporary name and renamed,
so a crash never leaves a half checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import FinetuneError

STEP_PREFIX = "step_"


@dataclass
class LoopState:
    step: int = 0
    """Optimizer steps done."""
    micro_step: int = 0
    """Micro-batches consumed (steps × gradient accumulation), which fixes the position in the data."""
    loss_avg: float = 0.0


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
                  and (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(run_dir: Path, state: LoopState, *, trainable: dict[str, torch.Tensor],
                    extra: dict[str, torch.Tensor], optimizer, lr_scheduler, generator: torch.Generator,
                    keep: int) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{STEP_PREFIX}{state.step:06d}"
    tmp = folder / f".{final.name}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous_cpu(trainable), str(tmp / "trainable.safetensors"))
    if extra:
        save_file(_contiguous_cpu(extra), str(tmp / "extra.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"generator": generator.get_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(folder, keep=max(1, keep))
    return final


def load_checkpoint(path: Path, *, optimizer, lr_scheduler, generator: torch.Generator):
    """Restore optimizer, scheduler and RNG in place; return (state, trainable, extra) for the method to load."""
    try:
        state = LoopState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
        trainable = load_file(str(path / "trainable.safetensors"))
        extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").exists() else {}
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        generator.set_state(torch.load(path / "rng.pt", weights_only=True)["generator"])
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FinetuneError(f"the checkpoint cannot be read ({exc})",
                            "delete this checkpoint folder to resume from the one before, or start without --resume",
                            where=str(path)) from None
    return state, trainable, extra


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _prune(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
