"""Device memory of a training run, in seconds: an analytic estimate and the planner that picks memory levers.

The estimate is parameters x bytes for weights, gradients and optimizer states, plus activations from a per-model
table measured by the memory instrument (`bench/memory.py`, which runs real training steps through the loop's code
on the meta device) for each model, method kind and gradient checkpointing. A step peaks either at the end of the
forward pass (every activation saved for backward, no gradient yet) or late in backward (most gradients made, a few
activations left): the table holds both, each as a fixed part and a part per latent pixel per sample, and the
estimate takes the higher. The planner enumerates the combinations of levers the user left at auto and keeps the
fastest whose estimate plus a margin fits the budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FP8_METHODS, Config
from .errors import ConfigError
from .runfolder import read_safetensors_header

GIB = 2**30
LEVERS = ("adamw8bit", "fused_backward", "offload_encoders", "fp8_base", "gradient_checkpointing")
LEVER_SLOWDOWN = {"adamw8bit": 1.02, "fused_backward": 1.0, "offload_encoders": 1.01, "fp8_base": 1.15,
                  "gradient_checkpointing": 1.35}
"""Assumed step time with each lever, relative to none (not yet measured on a GPU): 8-bit Adam's step is a little
slower than fused AdamW's and rounds its state (so it is picked only where it is needed to fit), the fused backward
changes only when the optimizer runs, parked encoders cost a transfer per encoding (first epoch only),
fp8 weights an upcast per layer, checkpointing a second forward of most of the UNet."""
MARGIN_FRACTION, MARGIN_BYTES = 0.10, 0.5 * GIB
"""Kept free beside the estimate: the allocator's fragmentation, cuDNN workspaces, kernels' scratch."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    name: str
    unet_params: int
    text_params: int
    vae_params: int
    lora_params_per_rank: dict[str, int]
    """LoRA parameters at rank 1, by `lora.targets`."""
    activations: dict[str, tuple[float, float, float, float]]
    """By `activation_key` ("lora-gc", "lora-nogc-fp8", ...), at 16-bit activations: the forward peak's fixed bytes
    and bytes per latent pixel per sample, then the same for the backward peak beyond the gradients."""

    def scaled(self, unet_params: int, text_params: int, vae_params: int) -> "ModelShape":
        """The same family with another UNet size: LoRA and activations in proportion (a rough guess)."""
        k = unet_params / self.unet_params
        return ModelShape(f"{self.name}-like", unet_params, text_params, vae_params,
                          {t: round(n * k) for t, n in self.lora_params_per_rank.items()},
                          {key: tuple(v * k for v in entry) for key, entry in self.activations.items()})


@dataclass(frozen=True)
class Setup:
    """The settings that decide memory."""

    method: str
    batch: int
    resolution: int
    weight_bytes: int
    """2 for bf16/fp16 training, 4 for fp32."""
    rank: int = 16
    targets: str = "attention"
    prior_preservation: bool = False
    ema: bool = False
    train_text_encoder: bool = False

    @property
    def latent_pixels(self) -> int:
        """Latent pixels of the batch (prior preservation runs the class images' batch of the same size too)."""
        return (self.resolution // 8) ** 2 * self.batch

    @classmethod
    def from_config(cls, cfg: Config, *, on_gpu: bool = True) -> "Setup":
        t = cfg.train
        half = t.mixed_precision in ("bf16", "fp16") or (t.mixed_precision == "auto" and on_gpu)
        full = t.method == "full"
        return cls(t.method, t.batch_size, cfg.data.resolution, 2 if half else 4, cfg.lora.rank, cfg.lora.targets,
                   cfg.dreambooth.enabled and cfg.dreambooth.prior_preservation, full and cfg.full.ema,
                   cfg.full.train_text_encoder if full else cfg.lora.train_text_encoder and t.method == "lora")


def activation_key(full: bool, levers: frozenset[str] | set[str], prior: bool = False) -> str:
    """fp8 layers save less for backward than a plain convolution (no input): their own entry. The fused backward
    runs the optimizer inside backward: its own entry. Prior preservation runs a second forward pass in the same
    graph: with checkpointing its own entry (both passes' checkpoints are kept but only one block is recomputed at a
    time), otherwise the plain entry at twice the pixels."""
    key = f"{'full' if full else 'lora'}-{'gc' if 'gradient_checkpointing' in levers else 'nogc'}"
    key += "-fp8" if "fp8_base" in levers and not full else ""
    key += "-fused" if "fused_backward" in levers and full else ""
    return key + "-prior" if prior and "gradient_checkpointing" in levers else key


def activation_entry(shape: ModelShape, full: bool, levers: frozenset[str] | set[str],
                     prior: bool = False) -> tuple[tuple[float, ...], int]:
    """The table entry and how many times the batch's pixels it is applied to: the lever's own entry where the
    table has one, else the nearest one without it."""
    key = activation_key(full, levers, prior)
    names = [key]
    for suffix in ("-prior", "-fused", "-fp8"):
        key = key.replace(suffix, "")
        names.append(key)
    name = next((n for n in names if n in shape.activations), None)
    if name is None:
        raise KeyError(names[0])
    return shape.activations[name], 2 if prior and not name.endswith("-prior") else 1


def estimate_bytes(shape: ModelShape, setup: Setup, levers: frozenset[str] | set[str] = frozenset()) -> dict[str, float]:
    """Peak device bytes of a steady training step, by part: "static" sums the parameter terms (UNet, encoders,
    adapters, optimizer states); "total" adds the higher of the forward activations and the gradients with the
    backward activations."""
    full = setup.method == "full"
    unet_bytes = 4 if full else (1 if "fp8_base" in levers else setup.weight_bytes)
    trained = shape.unet_params if full else shape.lora_params_per_rank.get(setup.targets, 0) * setup.rank
    if setup.train_text_encoder:
        trained += shape.text_params if full else 0
    encoders_on_device = "offload_encoders" not in levers or setup.train_text_encoder
    encoders = (shape.text_params * (4 if full and setup.train_text_encoder else setup.weight_bytes)
                + shape.vae_params * setup.weight_bytes) if encoders_on_device else 0
    optimizer = trained * (2 if "adamw8bit" in levers else 8) + (trained * 4 if setup.ema else 0)
    grads = 0 if "fused_backward" in levers else trained * 4
    forward, backward = _activation_bytes(*activation_entry(shape, full, levers, setup.prior_preservation), setup)
    parts = {"unet": shape.unet_params * unet_bytes, "encoders": encoders, "adapters": 0 if full else trained * 4,
             "optimizer": optimizer}
    parts["static"] = sum(parts.values())
    parts.update(grads=grads, forward=forward, backward=backward)
    parts["total"] = parts["static"] + max(forward, grads + backward)
    return parts


def _activation_bytes(entry: tuple[float, ...], passes: int, setup: Setup) -> tuple[float, float]:
    """The forward and the backward peaks' activation bytes (the table is at 16-bit activations)."""
    pixels = setup.latent_pixels * passes
    fwd_fixed, fwd_pixel, bwd_fixed, bwd_pixel = entry
    scale = setup.weight_bytes / 2
    return (fwd_fixed + fwd_pixel * pixels) * scale, (bwd_fixed + bwd_pixel * pixels) * scale


def fit_point(shape: ModelShape, setup: Setup, levers: set[str], forward_peak: float,
              backward_peak: float) -> tuple[int, float, float]:
    """One measured step as `fit_activation_entry` takes it: the peaks less the estimate's parameter terms."""
    zeros = dict.fromkeys(("lora-nogc", "lora-gc", "full-nogc", "full-gc"), (0.0, 0.0, 0.0, 0.0))
    parts = estimate_bytes(dataclasses.replace(shape, activations=zeros), setup, levers)
    return setup.latent_pixels, forward_peak - parts["static"], backward_peak - parts["static"] - parts["grads"]


def fit_activation_entry(points: list[tuple[int, float, float]], weight_bytes: int = 2) -> tuple[float, ...]:
    """A table entry from two measured steps: (latent pixels, forward peak minus the static parts, backward peak
    minus the static parts and the gradients), each in bytes at `weight_bytes` activations."""
    (p1, f1, b1), (p2, f2, b2) = points
    scale = 2 / weight_bytes
    fwd_pixel, bwd_pixel = (f2 - f1) / (p2 - p1), (b2 - b1) / (p2 - p1)
    return (round((f1 - fwd_pixel * p1) * scale), round(fwd_pixel * scale, 1),
            round((b1 - bwd_pixel * p1) * scale), round(bwd_pixel * scale, 1))


_PARAMS = {  # UNet, text encoders, VAE; LoRA parameters at rank 1 by targets (counted on the shipped configs)
    "sd15": (859520964, 123060480, 83653863,
             {"attention": 199296, "attention_ff": 374016, "all_linear": 422336, "all": 1050816}),
    "sd21v": (865910724, 340387840, 83653863,
              {"attention": 207488, "attention_ff": 382208, "all_linear": 480448, "all": 1059008}),
    "sdxl": (2567463684, 817720320, 83653863,
             {"attention": 1451520, "attention_ff": 2616320, "all_linear": 2695360, "all": 3074240}),
}
ACTIVATIONS: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "sd15": {"lora-nogc": (6107656, 284612.8, -6647280, 283919.1), "lora-gc": (63496, 53814.7, -12540400, 66953.6),
             "lora-nogc-fp8": (8007508, 249692.8, -5566628, 248359.1),
             "lora-gc-fp8": (131071316, 37209.7, 89747073, 50585.0),
             "lora-gc-prior": (123660, 96117.3, -12480232, 109256.2),
             "lora-gc-fp8-prior": (131131480, 64952.3, 89807241, 78327.6),
             "full-nogc": (1678773256, 308035.8, -815256597, 277857.7),
             "full-gc": (219982856, 55818.7, 72087527, 40004.1),
             "full-gc-fused": (219982856, 55818.7, 358604962, 64576.4)},
    "sd21v": {"lora-nogc": (6107656, 273621.6, -7171568, 272940.2), "lora-gc": (63496, 43801.9, -13064688, 56879.3),
              "lora-nogc-fp8": (8007508, 248701.6, -6090916, 247380.2),
              "lora-gc-fp8": (1144148, 41161.9, -11984036, 53599.3),
              "lora-gc-prior": (123660, 75451.8, -13004520, 88529.2),
              "lora-gc-fp8-prior": (1204312, 68891.8, -11923868, 81329.2),
              "full-nogc": (1678773256, 307023.2, -1783589616, 305651.7),
              "full-gc": (219982856, 55781.2, -39133936, 43272.4),
              "full-gc-fused": (219982856, 55781.2, 222850064, 68632.8)},
    "sdxl": {"lora-nogc": (39375472, 473680.5, -53521800, 472348.7), "lora-gc": (64112, 37644.0, -92837000, 44019.6),
             "lora-nogc-fp8": (49477884, 451912.5, -48949628, 449948.7),
             "lora-gc-fp8": (5284769, 35079.0, -88264828, 41459.6),
             "lora-gc-prior": (116596, 70175.6, -92784512, 76551.2),
             "lora-gc-fp8-prior": (5337253, 64410.6, -88212340, 70791.2),
             "full-nogc": (4442163320, 532688.1, -5827668360, 531941.6),
             "full-gc": (162434672, 43628.0, -117453338, 26823.0),
             "full-gc-fused": (162434672, 43628.0, 162434680, 54448.2)},
}
"""Printed by `bench/memory.py --fit` (the instrument on the meta device, bf16, batch 1 and 8): the forward and the
backward peak's (fixed bytes, bytes per latent pixel per sample) by method kind, checkpointing, fp8 weights, the
fused backward and prior preservation."""


def known_shape(name: str) -> ModelShape:
    unet, text, vae, lora = _PARAMS[name]
    return ModelShape(name, unet, text, vae, lora, ACTIVATIONS.get(name, {}))


# ---- the model a config names ---------------------------------------------------------------------------------
def shape_of_file(path: Path, family_name: str | None = None) -> ModelShape | None:
    """The shape of a single-file checkpoint, from its safetensors header (no weights read); None when unknown."""
    header = _safetensors_header(path)
    if header is None:
        return None
    counts = {"unet": 0, "text": 0, "vae": 0}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        part = "unet" if key.startswith("model.diffusion_model.") else "vae" if key.startswith("first_stage_model.") \
            else "text" if key.startswith(("cond_stage_model.", "conditioner.")) else None
        if part:
            counts[part] += math.prod(info["shape"])
    family = family_name or ("sdxl" if any(k.startswith("conditioner.") for k in header) else
                             "sd21v" if any(k.startswith("cond_stage_model.model.") for k in header) else "sd15")
    known = known_shape(family)
    if abs(counts["unet"] / known.unet_params - 1) < 0.02:
        return dataclasses.replace(known, text_params=counts["text"] or known.text_params,
                                   vae_params=counts["vae"] or known.vae_params)
    return known.scaled(counts["unet"], counts["text"], counts["vae"]) if counts["unet"] else None


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        return read_safetensors_header(path)
    except (OSError, ValueError):
        return None


# ---- the planner ----------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    levers: tuple[str, ...]
    estimate_bytes: float
    budget_bytes: float | None
    budget_source: str
    """"train.memory_budget_gb", "free GPU memory" or "none" (nothing checked)."""
    mode: str
    candidates: list[tuple[tuple[str, ...], float, float]] = field(default_factory=list)
    """Every combination considered: (levers, estimate bytes, slowdown)."""

    def summary(self) -> dict[str, Any]:
        budget = None if self.budget_bytes is None else round(self.budget_bytes / GIB, 2)
        text = (f"memory ({self.mode}): {', '.join(self.levers) or 'no levers'}; estimate "
                f"{self.estimate_bytes / GIB:.1f} GiB" + (f" of {budget:.1f} GiB ({self.budget_source})"
                                                           if budget is not None else ""))
        return {"mode": self.mode, "levers": list(self.levers), "estimate_gb": round(self.estimate_bytes / GIB, 2),
                "budget_gb": budget, "budget_from": self.budget_source, "text": text}


def applicable_levers(setup: Setup, available: set[str]) -> list[str]:
    out = ["gradient_checkpointing"]
    if not setup.train_text_encoder:
        out.append("offload_encoders")
    if setup.method in FP8_METHODS:
        out.append("fp8_base")
    if "adamw8bit" in available:
        out.append("adamw8bit")
    if "fused_backward" in available and setup.method == "full":
        out.append("fused_backward")
    return out


def slowdown(levers: tuple[str, ...] | set[str]) -> float:
    return math.prod(LEVER_SLOWDOWN[name] for name in levers)


def with_margin(estimate: float) -> float:
    return estimate * (1 + MARGIN_FRACTION) + MARGIN_BYTES


def plan_levers(shape: ModelShape, setup: Setup, *, mode: str, forced_on: set[str], forced_off: set[str],
                available: set[str], budget: float | None, budget_source: str) -> MemoryPlan:
    """The levers to use: `forced_*` are the user's explicit settings (never changed), the others are chosen by
    `mode`. Raises ConfigError when nothing fits the budget."""
    free = [name for name in applicable_levers(setup, available) if name not in forced_on | forced_off]
    combos = [tuple(sorted(forced_on | set(c))) for n in range(len(free) + 1) for c in itertools.combinations(free, n)]
    scored = [(c, estimate_bytes(shape, setup, set(c))["total"], slowdown(c)) for c in combos]
    if mode == "max_speed" or (mode == "auto" and budget is None):
        pick = min(scored, key=lambda s: (len(s[0]), s[1]))
    elif mode == "lowest":
        pick = min(scored, key=lambda s: (s[1], s[2]))
    else:
        fitting = [s for s in scored if with_margin(s[1]) <= budget]
        if not fitting:
            raise _nothing_fits(shape, setup, scored, budget, budget_source)
        pick = min(fitting, key=lambda s: (s[2], s[1]))
    return MemoryPlan(pick[0], pick[1], budget, budget_source, mode, scored)


def _nothing_fits(shape: ModelShape, setup: Setup, scored, budget: float, source: str) -> ConfigError:
    least = min(scored, key=lambda s: s[1])
    needed = with_margin(least[1])
    fits = [b for b in range(setup.batch - 1, 0, -1)
            if with_margin(estimate_bytes(shape, dataclasses.replace(setup, batch=b), set(least[0]))["total"]) <= budget]
    smaller = [r for r in range(setup.resolution - 64, 255, -64)
               if with_margin(estimate_bytes(shape, dataclasses.replace(setup, resolution=r), set(least[0]))["total"])
               <= budget]
    would = (f"train.batch_size {fits[0]}" if fits else f"data.resolution {smaller[0]}" if smaller
             else "a GPU with more memory")
    return ConfigError(
        f"this training needs about {needed / GIB:.1f} GiB even with every memory lever "
        f"({', '.join(least[0]) or 'none'}), but {budget / GIB:.1f} GiB are available ({source})",
        f"use {would}, or free GPU memory (other programs), or raise train.memory_budget_gb if it is set too low",
        where="train.memory")


def plan_for_config(cfg: Config, shape: ModelShape | None, *, budget: float | None = None,
                    budget_source: str = "none", available: set[str] | None = None) -> tuple[Config, MemoryPlan | None]:
    """The config with every lever left at auto decided (explicit settings kept), and the plan behind it."""
    t = cfg.train
    if t.method not in ("lora", "full") or shape is None:
        return _levers_off(cfg), None
    if budget is None and t.memory_budget_gb > 0:
        budget, budget_source = t.memory_budget_gb * GIB, "train.memory_budget_gb"
    forced_on = {n for n in ("offload_encoders", "fp8_base", "fused_backward") if getattr(t, n) == "on"}
    forced_off = {n for n in ("offload_encoders", "fp8_base", "fused_backward") if getattr(t, n) == "off"}
    if t.gradient_checkpointing:
        forced_on.add("gradient_checkpointing")
    if t.optimizer != "auto":  # an optimizer the user named is kept
        (forced_on if t.optimizer == "adamw8bit" else forced_off).add("adamw8bit")
    if t.gradient_accumulation != 1 or t.max_grad_norm != 0:
        forced_off.add("fused_backward")
    if cfg.lora.algorithm == "dora":  # DoRA reads the base weights' norms in every step
        forced_off.add("fp8_base")
    plan = plan_levers(shape, Setup.from_config(cfg), mode=t.memory, forced_on=forced_on, forced_off=forced_off,
                       available=available if available is not None else _available(), budget=budget,
                       budget_source=budget_source)
    return _with_levers(cfg, set(plan.levers)), plan


def _available() -> set[str]:
    import importlib.util

    import torch

    found = {"fused_backward"}
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        found.add("adamw8bit")
    return found


def _with_levers(cfg: Config, levers: set[str]) -> Config:
    t = cfg.train
    optimizer = "adamw8bit" if "adamw8bit" in levers else "adamw" if t.optimizer == "auto" else t.optimizer
    train = dataclasses.replace(
        t, gradient_checkpointing="gradient_checkpointing" in levers, optimizer=optimizer,
        **{n: "on" if n in levers else "off" for n in ("offload_encoders", "fp8_base", "fused_backward")})
    return dataclasses.replace(cfg, train=train)


def _levers_off(cfg: Config) -> Config:
    t = cfg.train
    train = dataclasses.replace(t, optimizer="adamw" if t.optimizer == "auto" else t.optimizer,
                                **{n: "off" if getattr(t, n) == "auto" else getattr(t, n)
                                   for n in ("offload_encoders", "fp8_base", "fused_backward")})
    return dataclasses.replace(cfg, train=train)


def free_gpu_memory() -> float | None:
    """Free bytes on the training GPU now (after the host application has unloaded its models); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return float(free)
