"""Peak device memory of training, measured without a GPU, beside the planner's estimate and the goals.

    python bench/memory.py [--models sd15,sd21v,sdxl] [--batches 1,4,8] [--methods lora,dreambooth,full]
                           [--levers none,gc,encoders,fp8,8bit,fused,all] [--fit] [--picks]

Each row builds the full-size random-weight model on the meta device from the shipped configs and runs two
training steps through the loop's own setup (`trainers.model_setup.setup_method`), optimizer and the method's loss
under the memory instrument (`harness/memtrack.py`: MemTracker, CUDA-like autocast, flash-attention layout).
bf16, LoRA rank 16 on attention, AdamW (8-bit where the lever says so). With CUDA, `measured` is the same step's
`torch.cuda.max_memory_allocated` on the GPU. `--fit` measures batch 1 and 8 of each model and prints the
activation table for `trainers/memory.py` (the estimate is never fitted to the H100 check points). `--picks`
prints what `train.memory = "auto"` picks per budget. Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from harness import RESULTS
from harness.memtrack import measure_training_peak
from harness.report import save_results, table

MODELS = {"sd15": ("sd1", 512), "sd21v": ("sd2v", 768), "sdxl": ("sdxl", 1024)}
LEVER_SETS = {"none": (), "gc": ("gradient_checkpointing",), "encoders": ("offload_encoders",),
              "fp8": ("fp8_base",), "8bit": ("adamw8bit",), "fused": ("fused_backward",),
              "all": ("gradient_checkpointing", "offload_encoders", "fp8_base", "adamw8bit", "fused_backward")}
H100_CHECKS = {("sd15", "lora", 1): 4.0, ("sd15", "lora", 8): 10.8, ("sdxl", "lora", 1): 14.3,
               ("sdxl", "lora", 8): 64.9}
"""GiB, H100, eager, bf16, rank 16, no gradient checkpointing: a check, never fitted to."""
FIT_BATCHES = (1, 8)
"""The table's two points: a step's peak is the higher of two lines in the batch (forward, backward), so a line
through the ends of the range lies on or above it in between (the estimate errs on the safe side there)."""
GOALS = {("sd15", "lora"): ("<= 3 GiB", 3.0), ("sdxl", "lora"): ("<= 8 GiB without UNet offload", 8.0),
         ("sdxl", "full"): ("fits 24 GB (with the planner's margin)", 24.0)}
"""At batch 1 with the lowest-memory levers (the `all` set; UNet block offload is not measured: no GPU run yet).
A card's "24 GB" is 24 GiB; the margin is the one the planner keeps free."""


def row_config(name: str, method: str, batch: int, levers: tuple[str, ...]):
    from trainers.config import Config

    _, resolution = MODELS[name]
    has = set(levers)
    full = method == "full"
    return Config.from_dict({
        "model": {"base": f"random-{name}"}, "data": {"folder": "-", "resolution": resolution, "class_noun": "dog"},
        "train": {"method": "full" if full else "lora", "batch_size": batch, "mixed_precision": "bf16",
                  "gradient_checkpointing": "gradient_checkpointing" in has,
                  "optimizer": "adamw8bit" if "adamw8bit" in has else "adamw",
                  "offload_encoders": "on" if "offload_encoders" in has else "off",
                  "fp8_base": "on" if "fp8_base" in has and not full else "off",
                  "fused_backward": "on" if "fused_backward" in has and full else "off",
                  "max_grad_norm": 0.0 if full and "fused_backward" in has else 1.0},
        "lora": {"rank": 16, "alpha": 16.0},
        "dreambooth": {"enabled": method == "dreambooth"},
        "full": {"ema": False},
    })


def measure_row(name: str, method: str, batch: int, levers: tuple[str, ...]) -> dict:
    from trainers.memory import Setup, estimate_bytes, known_shape

    started = time.perf_counter()
    cfg, instrument = instrument_row(name, method, batch, levers)
    active = _active_levers(cfg)
    shape = known_shape(name)
    estimate = estimate_bytes(shape, Setup.from_config(cfg), active)["total"] if shape.activations else float("nan")
    return {"model": name, "resolution": MODELS[name][1], "batch": batch, "method": method, "levers": sorted(active),
            "gradient_checkpointing": cfg.train.gradient_checkpointing, "offload": False,
            "estimate_gb": round(estimate / 2**30, 3), "instrument_gb": round(instrument.peak_bytes / 2**30, 3),
            "measured_gb": measured_on_cuda(name, cfg), "trainable_params": instrument.trainable_params,
            "seconds": round(time.perf_counter() - started, 1)}


def measured_on_cuda(name: str, cfg) -> float | None:
    """`torch.cuda.max_memory_allocated` over the same steps on the GPU, in GiB (the model built on it, so the peak
    counts only training); None without CUDA or when the row does not fit."""
    if not torch.cuda.is_available():
        return None
    from gpu_speed import build_random_base

    torch.cuda.empty_cache()
    try:
        base = build_random_base(MODELS[name][0], tiny=False, dtype=torch.bfloat16, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        measure_training_peak(cfg, base, device="cuda")
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    except torch.OutOfMemoryError:
        return None
    finally:
        base = None
        torch.cuda.empty_cache()


def instrument_row(name: str, method: str, batch: int, levers: tuple[str, ...]):
    """The row's config and the instrument's measure of it."""
    from gpu_speed import build_random_base

    cfg = row_config(name, method, batch, levers)
    base = build_random_base(MODELS[name][0], tiny=False, dtype=torch.bfloat16, device="meta")
    return cfg, _with_8bit_stand_in(cfg, lambda: measure_training_peak(cfg, base, device="meta"))


def _active_levers(cfg) -> set[str]:
    t = cfg.train
    active = {name for name in ("offload_encoders", "fp8_base", "fused_backward") if getattr(t, name) == "on"}
    if t.gradient_checkpointing:
        active.add("gradient_checkpointing")
    if t.optimizer == "adamw8bit":
        active.add("adamw8bit")
    return active


def _with_8bit_stand_in(cfg, run):
    """bitsandbytes' 8-bit Adam needs CUDA: on the meta device a stand-in holds its state (two uint8 tensors per
    parameter, as bitsandbytes keeps, plus its small per-block scales, left out). It replaces the plain optimizer the
    loop's `make_optimizer` builds, so that `fused_backward` still wraps it (one per parameter)."""
    if cfg.train.optimizer != "adamw8bit" or torch.cuda.is_available():
        return run()
    import trainers.optimizers as optimizers

    original = optimizers._plain_optimizer
    optimizers._plain_optimizer = lambda cfg_, groups: _Adam8bitStandIn(groups)
    try:
        return run()
    finally:
        optimizers._plain_optimizer = original


class _Adam8bitStandIn(torch.optim.Optimizer):
    def __init__(self, groups):
        super().__init__(groups, {"lr": 1e-4})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p, dtype=torch.uint8)
                    state["v"] = torch.zeros_like(p, dtype=torch.uint8)
                p.add_(p.grad, alpha=-group["lr"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sd21v,sdxl")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--methods", default="lora,dreambooth,full")
    parser.add_argument("--levers", default="none,gc,all")
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--picks", action="store_true", help="print what train.memory = auto picks per budget")
    args = parser.parse_args()
    if args.fit:
        return fit(args.models.split(","))
    if args.picks:
        return picks()
    rows = []
    for name in args.models.split(","):
        for method in args.methods.split(","):
            for lever_set in args.levers.split(","):
                for batch in map(int, args.batches.split(",")):
                    row = measure_row(name, method, batch, LEVER_SETS[lever_set])
                    rows.append(row)
                    print(_line(row), flush=True)
    print(table(["model", "px", "batch", "method", "levers", "estimate GiB", "instrument GiB", "measured GiB",
                 "deviation", "H100 GiB", "vs H100", "goal"], [_cells(r) for r in rows]))
    save_results(RESULTS / "memory.json", {"rows": rows})
    worst = max(abs(r["estimate_gb"] / r["instrument_gb"] - 1) for r in rows)
    print(f"largest estimate deviation: {worst:.1%} (goal: within 10%)")
    return 0


def _line(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items())


def _cells(row: dict) -> list[str]:
    check = H100_CHECKS.get((row["model"], row["method"], row["batch"])) if not row["levers"] else None
    return [row["model"], str(row["resolution"]), str(row["batch"]), row["method"], "+".join(row["levers"]) or "-",
            f"{row['estimate_gb']:.2f}", f"{row['instrument_gb']:.2f}",
            "-" if row["measured_gb"] is None else f"{row['measured_gb']:.2f}",
            f"{row['estimate_gb'] / row['instrument_gb'] - 1:+.1%}", "-" if check is None else f"{check:.1f}",
            "-" if check is None else f"{row['instrument_gb'] / check - 1:+.0%}", _goal(row)]


def _goal(row: dict) -> str:
    from trainers.memory import GIB, with_margin

    goal = GOALS.get((row["model"], row["method"]))
    if goal is None or row["batch"] != 1 or not set(row["levers"]) >= {"gradient_checkpointing", "offload_encoders"}:
        return ""
    text, limit = goal
    need = with_margin(row["instrument_gb"] * GIB) / GIB if row["method"] == "full" else row["instrument_gb"]
    return f"{text}: {'met' if need <= limit else 'missed'}"


PICK_BUDGETS_GB = (4, 6, 8, 12, 16, 24, 80)
_GC, _FP8 = ("gradient_checkpointing",), ("fp8_base",)
FIT_ROWS = [("lora", ()), ("lora", _GC), ("lora", _FP8), ("lora", _FP8 + _GC), ("full", ()), ("full", _GC),
            ("full", ("fused_backward",) + _GC), ("dreambooth", _GC), ("dreambooth", _FP8 + _GC)]
"""The rows `--fit` measures, one table entry each."""


def picks() -> int:
    """The auto plan of a LoRA at batch 1 (rank 16, bf16, `optimizer = "auto"`) per budget, with bitsandbytes on a
    CUDA GPU (8-bit Adam is a choice) and without it, as a markdown table for bench/README.md."""
    from trainers.errors import ConfigError
    from trainers.memory import GIB, Setup, known_shape, plan_levers, with_margin

    print("| model (LoRA, batch 1) | budget GB | 8-bit Adam available | pick | estimate GiB | + margin GiB |")
    print("| --- | ---: | --- | --- | ---: | ---: |")
    for name in ("sd15", "sdxl"):
        setup = Setup("lora", 1, MODELS[name][1], 2)
        for budget in PICK_BUDGETS_GB:
            for available in ({"adamw8bit"}, set()):
                try:
                    plan = plan_levers(known_shape(name), setup, mode="auto", forced_on=set(), forced_off=set(),
                                       available=available, budget=budget * GIB, budget_source="bench")
                    cells = [", ".join(plan.levers) or "none", f"{plan.estimate_bytes / GIB:.2f}",
                             f"{with_margin(plan.estimate_bytes) / GIB:.2f}"]
                except ConfigError as exc:
                    cells = [f"nothing fits ({exc.problem.split(', but')[0]})", "-", "-"]
                print(f"| {name} | {budget} | {'yes' if available else 'no'} | " + " | ".join(cells) + " |")
    return 0


def fit(models: list[str]) -> int:
    """The activation table of trainers/memory.py: for each model, method kind and checkpointing, the forward and
    backward peaks above the estimate's parameter terms at `FIT_BATCHES` give a fixed part and a part per pixel."""
    from trainers.memory import Setup, activation_key, fit_activation_entry, fit_point, known_shape

    for name in models:
        entries = {}
        for method, levers in FIT_ROWS:
            points = []
            for batch in FIT_BATCHES:
                cfg, measured = instrument_row(name, method, batch, levers)
                setup = Setup.from_config(cfg)
                points.append(fit_point(known_shape(name), setup, set(levers), measured.forward_bytes,
                                        measured.backward_bytes))
            entries[activation_key(method == "full", set(levers), setup.prior_preservation)] = \
                fit_activation_entry(points)
        print(f"{name}: {entries}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
