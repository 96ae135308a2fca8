"""Resumable checkpoints: everything a training step depends on, so a resumed run continues exactly.

Layout: `<run>/checkpoints/step_000123/` with `trainable.safetensors`, `extra.safetensors` (e.g. EMA weights),
`optimizer.pt`, `scheduler.pt`, `scaler.pt` (fp16's loss scale), `rng_<rank>.pt` (one per process: its noise
generator and its global torch RNG, which draws dropout masks) and `state.json`. A checkpoint folder is written under
a temporary name, flushed to the disk and renamed, so a crash never leaves a half checkpoint that `--resume` would
pick up; one of the same step is replaced by renaming the new one into place before the old one is removed. A full
disk is a DiskFullError naming the folder, with the partial folder removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import FinetuneError
from .io import disk_full_named, fsync_file, fsync_tree
from .runfolder import CHECKPOINT_STATE_FILE, SET_ASIDE_SUFFIX, STEP_PREFIX, RunFolder

log = logging.getLogger(__name__)

LEGACY_RNG_FILE = "rng.pt"  # checkpoints written before each process saved its own RNG: the noise generator only


@dataclass
class LoopState:
    step: int = 0
    """Optimizer steps done."""
    micro_step: int = 0
    """Micro-batches consumed (steps × gradient accumulation), which fixes the position in the data."""
    loss_avg: float = 0.0


@dataclass
class Resumables:
    """What a step depends on besides the trained weights and the data position."""

    optimizer: Any
    lr_scheduler: Any
    generator: torch.Generator
    """This process's noise and timestep generator."""
    scaler: Any = None
    """The fp16 GradScaler (accelerate's `accelerator.scaler`); None without fp16."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    run = RunFolder(run_dir)
    if run.checkpoints.is_dir():
        _restore_set_aside(run.checkpoints)
    return run.latest_checkpoint()


def save_checkpoint(run_dir: Path, state: LoopState, method, resumables: Resumables, processes, *,
                    keep: int) -> Path:
    """Every process calls this (`processes` is the Accelerator or accelerate's PartialState): each one writes its
    own RNG state, the main process the weights (`method.trainable_state()` / `extra_state()`) and the rest."""
    run = RunFolder(run_dir)
    final = run.checkpoint(state.step)
    tmp = final.with_name(f".{final.name}.part")
    processes.wait_for_everyone()
    try:
        with disk_full_named(run.checkpoints):
            if processes.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            processes.wait_for_everyone()
            torch.save(_rng_state(resumables.generator), tmp / _rng_file(processes.process_index))
            processes.wait_for_everyone()
            if processes.is_main_process:
                _write_main_state(tmp, state, method, resumables)
                fsync_tree(tmp)
                replace_folder(tmp, final)
                _prune(run, keep=max(1, keep))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def replace_folder(new: Path, final: Path) -> None:
    """Put the whole folder `new` at `final`: the new one is renamed into place before the old one is removed, so
    a power cut leaves one of them whole (an old one set aside is put back by `latest_checkpoint`)."""
    old = final.with_name(f".{final.name}{SET_ASIDE_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_file(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _restore_set_aside(folder: Path) -> None:
    """A checkpoint set aside for its replacement, whose replacement never arrived (a crash in between), goes back."""
    for old in folder.glob(f".{STEP_PREFIX}*{SET_ASIDE_SUFFIX}"):
        final = old.with_name(old.name[1:-len(SET_ASIDE_SUFFIX)])
        if not final.exists():
            os.replace(old, final)


def load_checkpoint(path: Path, resumables: Resumables, *, rank: int = 0):
    """Restore optimizer, scheduler, scaler and this process's RNG states in place; return (state, trainable,
    extra) for the method to load."""
    try:
        state = LoopState(**json.loads((path / CHECKPOINT_STATE_FILE).read_text(encoding="utf-8")))
        trainable = load_file(str(path / "trainable.safetensors"))
        extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").exists() else {}
        resumables.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        resumables.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if resumables.scaler is not None and (path / "scaler.pt").exists():
            resumables.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        _restore_rng(path, rank, resumables.generator)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FinetuneError(f"the checkpoint cannot be read ({exc})",
                            "delete this checkpoint folder to resume from the one before, or start without --resume",
                            where=str(path)) from None
    return state, trainable, extra


def _write_main_state(tmp: Path, state: LoopState, method, resumables: Resumables) -> None:
    save_file(_contiguous_cpu(method.trainable_state()), str(tmp / "trainable.safetensors"))
    extra = method.extra_state()
    if extra:
        save_file(_contiguous_cpu(extra), str(tmp / "extra.safetensors"))
    torch.save(resumables.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(resumables.lr_scheduler.state_dict(), tmp / "scheduler.pt")
    if resumables.scaler is not None:
        torch.save(resumables.scaler.state_dict(), tmp / "scaler.pt")
    (tmp / CHECKPOINT_STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")


def _rng_file(rank: int) -> str:
    return f"rng_{rank}.pt"


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device: this process's GPU
    return states


def _restore_rng(path: Path, rank: int, generator: torch.Generator) -> None:
    own = path / _rng_file(rank)
    if not own.exists():
        legacy = path / LEGACY_RNG_FILE
        if rank == 0 and legacy.exists():
            generator.set_state(torch.load(legacy, weights_only=True)["generator"])
            return
        # More processes than the run had: this one starts from its seed (the data is split differently anyway).
        log.warning("%s has no RNG state for process %d; it continues from its seed", path, rank)
        return
    states = torch.load(own, weights_only=True)
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _prune(run: RunFolder, keep: int) -> None:
    for old in run.step_folders()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
