"""The optimizers a run can use, their default learning rates, and schedule-free's averaged weights.

adamw and adamw8bit take the method's learning rate; prodigy (prodigyopt) and schedulefree_adamw (schedulefree)
need no tuning; adafactor (torch's own) keeps factored second moments, for full fine-tunes in little memory.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch

from .config import Config
from .errors import ConfigError

PACKAGES = {"prodigy": ("prodigyopt", "prodigyopt>=1.1"), "schedulefree_adamw": ("schedulefree", "schedulefree>=1.4"),
            "adamw8bit": ("bitsandbytes", "bitsandbytes")}
"""Optimizers from packages of their own: (import name, pip requirement)."""


def make_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.train.fused_backward == "on":
        from .levers import FusedBackwardOptimizer

        return FusedBackwardOptimizer(groups, lambda group: _plain_optimizer(cfg, group))
    return _plain_optimizer(cfg, groups)


def _plain_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    train = cfg.train
    name = train.optimizer
    package = check_available(name)
    if name == "adamw8bit":
        return package.optim.AdamW8bit(groups, weight_decay=train.weight_decay)
    if name == "prodigy":
        # safeguard_warmup: without it Prodigy's step-size estimate grows too fast while the warmup keeps lr small.
        return package.Prodigy(groups, weight_decay=train.weight_decay, safeguard_warmup=train.warmup_steps > 0)
    if name == "schedulefree_adamw":
        # Schedule-free warms up inside the optimizer (its averaging weights follow the warmup); the loop's scheduler
        # stays constant (see `scheduler_name`).
        optimizer = package.AdamWScheduleFree(groups, weight_decay=train.weight_decay, warmup_steps=train.warmup_steps)
        optimizer.train()
        return optimizer
    if name == "adafactor":
        return torch.optim.Adafactor(groups, weight_decay=train.weight_decay)
    params = [p for group in groups for p in group["params"]]
    # One fused kernel per step instead of several per parameter: it matters with hundreds of small LoRA tensors.
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, weight_decay=train.weight_decay, fused=fused)


def scheduler_name(cfg: Config) -> str:
    """The learning-rate schedule the loop runs: schedule-free replaces the schedule (and does its own warmup)."""
    return "constant" if cfg.train.optimizer == "schedulefree_adamw" else cfg.train.lr_scheduler


def scheduler_warmup(cfg: Config) -> int:
    return 0 if cfg.train.optimizer == "schedulefree_adamw" else cfg.train.warmup_steps


def check_available(name: str):
    """The optimizer's package (None for torch's own); a missing package or GPU fails with the fix before any model
    is loaded."""
    if name == "adamw8bit" and not torch.cuda.is_available():
        raise ConfigError("8-bit Adam needs a CUDA GPU", "use optimizer adamw", where="train.optimizer")
    return _import(name)


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside: the weights to sample, validate and export with. Schedule-free trains at one point (y) and evaluates at
    the average it keeps (x); elsewhere both are the same weights and this does nothing.

    The training weights are copied and put back bit for bit instead of schedulefree's own `train()`, which
    recomputes them from x and z with rounding: a run that samples would drift from one that does not, and a resumed
    run from the uninterrupted one."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    groups = inner.param_groups
    if not (hasattr(inner, "eval") and groups and groups[0].get("train_mode", False)):
        yield
        return
    params = [p for group in groups for p in group["params"]]
    kept = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, kept):
                param.copy_(value)
        for group in groups:
            group["train_mode"] = True


def _import(name: str):
    if name not in PACKAGES:
        return None
    module, requirement = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"optimizer {name} needs the {module} package",
                          f"pip install '{requirement}' (in ComfyUI's Python), or use optimizer adamw",
                          where="train.optimizer") from None
