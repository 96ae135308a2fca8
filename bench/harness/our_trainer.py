"""Our trainer as its own child process (`python -m trainers train CONFIG --events`), so that its peak memory is
its own: the step reports come from its progress events, the peak RSS from the kernel when it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import REPO
from .measure import RssWatcher, child_import_rss, cpu_seconds, wait_with_peak_rss


@dataclass
class Setup:
    """What every trainer in a comparison gets alike."""

    checkpoint: Path
    images: Path
    steps: int
    rank: int
    learning_rate: float
    batch_size: int
    resolution: int
    seed: int = 7


@dataclass
class TrainerRun:
    step_stamps: dict[int, float] = field(default_factory=dict)
    """Optimizer step -> when its report arrived (perf_counter)."""
    cpu_stamps: dict[int, float] = field(default_factory=dict)
    """Optimizer step -> CPU seconds (user + system) the training process had used by then."""
    peak_rss: int = 0
    """Bytes, of the training process."""
    watcher: RssWatcher | None = None
    wall_s: float = 0.0
    returncode: int = 0
    log: Path | None = None
    last_event: dict[str, Any] = field(default_factory=dict)


def write_config(path: Path, setup: Setup, *, run_root: Path, name: str, cache: bool, lora: dict | None = None,
                 **extra_train: Any) -> Path:
    config = {
        "model": {"base": str(setup.checkpoint)},
        "data": {"folder": str(setup.images), "resolution": setup.resolution, "buckets": False},
        "train": {"steps": setup.steps, "batch_size": setup.batch_size, "learning_rate": setup.learning_rate,
                  "mixed_precision": "no", "seed": setup.seed, "cache_latents": cache,
                  "cache_text_embeddings": cache, **extra_train},
        "lora": {"rank": setup.rank, "alpha": float(setup.rank), **(lora or {})},
        "output": {"dir": str(run_root), "name": name, "overwrite": True, "tensorboard": False},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def trainer_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_trainer(config: Path, log: Path, env: dict[str, str], python: str = sys.executable,
                prefix: list[str] | None = None) -> TrainerRun:
    """Train to the end; `prefix` goes before `-m trainers` (e.g. a profiler's `-m cProfile -o FILE`)."""
    command = [python, *(prefix or []), "-m", "trainers", "train", str(config), "--events"]
    run = TrainerRun(log=log)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
        assert process.stdout is not None
        run.watcher = RssWatcher(process.pid).start()
        for line in process.stdout:
            now = time.perf_counter()
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            run.last_event = event
            if event.get("event") == "progress":
                step = int(event["step"])
                run.step_stamps[step] = now
                run.cpu_stamps[step] = cpu_seconds(run.watcher.process)
        run.watcher.stop()
        run.returncode, run.peak_rss = wait_with_peak_rss(process)
    run.wall_s = time.perf_counter() - started
    if run.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeError(f"the trainer exited with status {run.returncode} ({config}):\n" + "\n".join(tail))
    return run


def trainer_floor_rss(env: dict[str, str], python: str = sys.executable) -> int:
    """What `python -m trainers train` holds once its modules are imported, before the model is loaded."""
    return child_import_rss(python, "import trainers.loop, trainers.methods.lora", REPO, env)
