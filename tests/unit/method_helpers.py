"""A run's method rebuilt outside the loop, on a freshly loaded base model: for before/after measurements."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from trainers.batches import BatchPreparer
from trainers.checkpointing import latest_checkpoint
from trainers.config import Config
from trainers.methods import Method, method_class
from trainers.models.loading import load_base_model
from trainers.plan import Plan, make_plan


def rebuilt_method(cfg: Config, run_dir: Path | None = None) -> tuple[Method, Plan]:
    """The method as the loop sets it up; with `run_dir`, holding the weights of that run's last checkpoint."""
    plan = make_plan(cfg)
    base = load_base_model(plan.cfg.model)
    method = method_class(plan.cfg.train.method)(plan.cfg, base)
    method.setup()
    method.prep = BatchPreparer(base, cache_latents=False, cache_text=not method.trains_text_encoder)
    if run_dir is not None:
        method.load_trainable_state(load_file(str(latest_checkpoint(run_dir) / "trainable.safetensors")))
    return method, plan
