"""LoRA training speed on one GPU: full-size SD1.5 (512 px) and SDXL (1024 px) with random weights, bf16, SDPA
attention, batch 1 and 8, through our real training loop (`trainers.loop.train`).

    python bench/gpu_speed.py [--models sd15,sdxl] [--batches 1,8] [--gradient-checkpointing off|on|both]
                                 [--compile off,reduce-overhead,blocks:reduce-overhead,...] [--warm] [--profile]
    python bench/gpu_speed.py --device cpu --tiny     # the same code on tiny models: proves the script end to end
    python bench/gpu_speed.py --device cpu --resolution 128 --batches 1 --compile off,default,blocks:default --warm
                                                      # full-size models, small images: compile times on a CPU

Nothing is downloaded: each model is built in memory from the shipped diffusers configs (random weights) and
handed to the loop in place of a loaded file; everything else (LoRA injection, caching, mixed precision, optimizer,
checkpoint, export) is the loop's own. Model FLOPs: one UNet forward counted with torch.utils.flop_counter, x3 for
forward + backward. Goals on one H100: SD1.5 1000 steps at batch 1 in <= 60 s, SDXL 1000 steps at 1024 px in <= 4 min,
>= 40% MFU at batch 8. Without a CUDA device (and without --device cpu) it prints "no CUDA device: skipped".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import RESULTS
from harness.measure import choose_threads, steady_s_per_step
from harness.report import fmt, machine, save_results, table

MODELS = {"sd15": ("sd1", 512), "sdxl": ("sdxl", 1024)}
"""bench name -> (family, resolution)."""
TINY_RESOLUTION = 64
CPU_MAX_RESOLUTION = 256
"""Full-size models on a CPU only at this many pixels or fewer."""
WARM = " (warm)"
"""Suffix of a compile variant rerun on the compile cache its first run left."""
SD15_REFERENCE_TFLOP = 0.85
"""One SD1.5 UNet forward at a 64x64 latent (512 px), batch 1: what the count should come near."""
STEP_GOALS_S = {"sd15": 60.0, "sdxl": 240.0}
"""1000 steps at batch 1, at most."""
MFU_GOAL = 0.40
"""At batch 8, at least."""
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0))
"""Dense bf16 tensor-core peaks from the vendor's data sheets, matched against the device name in this order."""


@dataclass
class Row:
    model: str
    resolution: int
    batch: int
    checkpointing: bool
    compile_mode: str = "off"
    """off (eager), or the compile variant: `train.compile_mode`, prefixed `blocks:` for `compile_scope = "blocks"`;
    ` (warm)` marks the rerun on the compile cache the first run left."""
    attention: str = "-"
    s_per_step: float | None = None
    to_first_step_s: float | None = None
    """From the built model to the first step's report: moving it to the device, LoRA injection, the first batch's
    encoding and (cold or warm) compiling; building the random weights is left out."""
    forward_flops: float | None = None
    peak_gpu_bytes: int | None = None
    error: str = ""
    compile_notes: str = ""

    @property
    def projected_1000_s(self) -> float | None:
        return None if self.s_per_step is None else 1000 * self.s_per_step

    def mfu(self, peak_tflops: float | None) -> float | None:
        if not (self.s_per_step and self.forward_flops and peak_tflops):
            return None
        return 3 * self.forward_flops / self.s_per_step / (peak_tflops * 1e12)


class UnetFlops:
    """Counts the FLOPs of the UNet's first forward in the run (hooks on the module, so the count sees exactly the
    call the loss makes, LoRA layers and autocast included)."""

    def __init__(self, unet: torch.nn.Module):
        self.total: float | None = None
        self._mode = None
        self._handles = [unet.register_forward_pre_hook(self._before), unet.register_forward_hook(self._after)]

    def _before(self, module, args):
        if self.total is None and self._mode is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def _after(self, module, args, output):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.total = float(self._mode.get_total_flops())
            self._mode = None
            for handle in self._handles:
                handle.remove()


def build_random_base(family: str, *, tiny: bool, dtype: torch.dtype, device: str):
    """The base model the loop would have loaded: full size from the shipped configs (random weights, built on the
    target device so that it takes seconds), or the tiny test model."""
    from diffusers import DDPMScheduler
    from tiny_models import random_model, tiny_pipeline_dir
    from trainers.config import ModelConfig
    from trainers.models.loading import load_base_model

    if tiny:
        return load_base_model(ModelConfig(base=str(tiny_pipeline_dir(family))), dtype=dtype)
    with torch.device(device):
        base = random_model(family, unet={}, text={}, vae={})
    base.noise_scheduler = DDPMScheduler.from_config(base.noise_scheduler.config)  # its tables on the CPU, as loaded
    for module in (base.unet, base.vae, *base.text_encoders):
        module.to(dtype=dtype)
    return base


@contextlib.contextmanager
def loop_builds_model(family: str, *, tiny: bool, device: str, count_flops: bool = True):
    """Within the block, the loop's `load_base_model` builds the model in memory instead of reading a file; yields
    what it built: {"unet": ..., "flops": UnetFlops}."""
    import trainers.loop as loop

    original, built = loop.load_base_model, {}

    def load(model_cfg, *, dtype=torch.float32):
        base = build_random_base(family, tiny=tiny, dtype=dtype, device=device)
        built["unet"], built["at"] = base.unet, time.perf_counter()
        if count_flops:  # the counter would run inside a compiled graph: compiled rows borrow the eager count
            built["flops"] = UnetFlops(base.unet)
        return base

    loop.load_base_model = load
    try:
        yield built
    finally:
        loop.load_base_model = original


def attention_kind(unet: torch.nn.Module) -> str:
    names = {type(p).__name__ for p in unet.attn_processors.values()}
    return "SDPA" if names == {"AttnProcessor2_0"} else ",".join(sorted(names))


def compile_settings(variant: str) -> dict:
    """The `train` settings of a compile variant: off, MODE (the whole UNet) or blocks:MODE (its repeated blocks)."""
    if variant == "off":
        return {}
    scope, _, mode = variant.rpartition(":")
    return {"compile": True, "compile_mode": mode, "compile_scope": scope or "unet"}


def bench_config(name: str, resolution: int, batch: int, checkpointing: bool, compile_mode: str, images: Path, args,
                 work: Path):
    from trainers.config import Config

    return Config.from_dict({
        "model": {"base": f"random-{name}"},
        "data": {"folder": str(images), "resolution": resolution, "buckets": False},
        "train": {"steps": args.steps, "batch_size": batch, "learning_rate": 1e-4, "mixed_precision": "bf16",
                  "gradient_checkpointing": checkpointing, "seed": 7,
                  **compile_settings(compile_mode)},
        "lora": {"rank": args.rank, "alpha": float(args.rank)},
        "output": {"dir": str(work / "runs"), "name": f"{name}-b{batch}-gc{int(checkpointing)}-{compile_mode.replace(':', '-')}",
                   "overwrite": True,
                   "tensorboard": False},
    })


def measure(name: str, batch: int, checkpointing: bool, args: argparse.Namespace, work: Path,
            extra_callbacks: tuple = (), compile_mode: str = "off", compile_cache: Path | None = None) -> Row:
    """One configuration through `trainers.loop.train`, timed by its progress events. A compiled one uses the
    compile cache folder `compile_cache`: an empty one pays what a first run pays, the folder a first run left what a
    later run pays."""
    from accelerate import Accelerator
    from tests.unit.train_helpers import make_images
    from trainers.loop import train

    family, resolution = MODELS[name]
    resolution = args.resolution or (TINY_RESOLUTION if args.tiny else resolution)
    row = Row(name, resolution, batch, checkpointing, compile_mode)
    compiled = compile_mode != "off"
    images = make_images(work / f"images-{resolution}", count=max(8, batch), size=resolution)
    warmup = max(args.warmup, -(-len(list(images.glob("*.png"))) // batch))  # past the epoch that fills the cache
    if warmup >= args.steps - 1:
        row.error = f"--steps {args.steps} leaves no timed steps after a warm-up of {warmup}"
        return row
    stamps: dict[int, float] = {}

    def on_event(event):
        if event["event"] == "progress":
            stamps[int(event["step"])] = time.perf_counter()

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    accelerator = Accelerator(mixed_precision="bf16", cpu=not cuda)
    cache = compile_cache_folder(compile_cache if compiled else None)
    with loop_builds_model(family, tiny=args.tiny, device=args.device, count_flops=not compiled) as built, cache:
        try:
            train(bench_config(name, resolution, batch, checkpointing, compile_mode.removesuffix(WARM), images, args,
                               work),
                  callbacks=[on_event, *extra_callbacks],
                  accelerator=accelerator)
        except Exception as exc:  # one failed configuration must not hide the others' numbers
            row.error = "out of GPU memory" if _out_of_memory(exc) else f"failed: {type(exc).__name__}"
            if not _out_of_memory(exc):
                traceback.print_exc()
        if "unet" in built:
            row.to_first_step_s = stamps[1] - built["at"] if 1 in stamps else None
            row.attention = attention_kind(built["unet"])
            row.forward_flops = built["flops"].total if "flops" in built else None
        built.clear()
    if cuda:
        row.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    accelerator.free_memory()
    if compiled:
        row.compile_notes = compile_notes()
        torch.compiler.reset()  # the next configuration compiles afresh (no dynamic-shape recompile, no old graphs)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if not row.error:
        row.s_per_step = steady_s_per_step(stamps, warmup)
    return row


def compile_cache_folder(folder: Path | None):
    """torch's compile cache (generated kernels, compiled graphs) in `folder` for the block, with the in-memory
    caches cleared on the way in and out, as in a new process."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    if folder is None:
        return contextlib.nullcontext()
    folder.mkdir(parents=True, exist_ok=True)
    return temporary_cache_dir(str(folder))


def measure_with_fallback(name: str, batch: int, ckpt: bool, args, work: Path, mode: str, cache: Path,
                          rows: list[Row]) -> Row:
    """`measure`, again with gradient checkpointing when it runs out of memory without; compiled rows borrow the
    eager row's FLOP count."""
    row = measure(name, batch, ckpt, args, work, compile_mode=mode, compile_cache=cache)
    if row.error == "out of GPU memory" and not ckpt and args.gradient_checkpointing == "off":
        print(f"  {name} batch {batch}: out of memory, again with gradient checkpointing", flush=True)
        row = measure(name, batch, True, args, work, compile_mode=mode, compile_cache=cache)
    eager = next((r for r in rows if (r.model, r.batch) == (name, batch) and r.forward_flops), None)
    if row.forward_flops is None and eager is not None:
        row.forward_flops = eager.forward_flops
    print(f"  {name} batch {batch} grad ckpt {'on' if row.checkpointing else 'off'} compile {mode}: "
          f"{row.error or fmt(row.s_per_step, 4) + ' s/step'}, first step after {fmt(row.to_first_step_s, 1)} s"
          + (f" ({row.compile_notes})" if row.compile_notes else ""), flush=True)
    return row


def compile_notes() -> str:
    """What torch.compile made of the UNet: graphs, graph breaks and steps left without CUDA graphs (each costs
    launches on the host)."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    skips = counters["inductor"].get("cudagraph_skips", 0)
    notes = f"{counters['stats'].get('unique_graphs', 0)} graph(s), {breaks} graph break(s), {skips} cudagraph skip(s)"
    counters.clear()
    return notes


def _out_of_memory(exc: BaseException) -> bool:
    # cuBLAS/cuDNN report a failed allocation as a RuntimeError rather than torch.OutOfMemoryError
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc) or "ALLOC_FAILED" in str(exc)


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    device_name = torch.cuda.get_device_name(0)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def goal_cells(row: Row, mfu: float | None, tiny: bool) -> list[str]:
    """[goal, ratio to it, verdict]; a ratio <= 1 meets a time goal, >= 1 meets the MFU goal."""
    if tiny or row.error or row.resolution != MODELS[row.model][1]:
        return ["-", "-", "-"]
    if row.batch == 1 and row.model in STEP_GOALS_S and row.projected_1000_s is not None:
        goal = STEP_GOALS_S[row.model]
        value = row.projected_1000_s / goal
        return [f"1000 steps <= {goal:.0f} s", f"{value:.2f}x", "met" if value <= 1 else "missed"]
    if row.batch == 8 and mfu is not None:
        value = mfu / MFU_GOAL
        return [f"MFU >= {MFU_GOAL:.0%}", f"{value:.2f}x", "met" if value >= 1 else "missed"]
    return ["-", "-", "-"]


def results_table(rows: list[Row], peak: float | None, tiny: bool) -> str:
    cells = []
    for row in rows:
        mfu = row.mfu(peak)
        flop = "-" if row.forward_flops is None else f"{row.forward_flops / 1e12:.3g}"
        samples = row.batch / row.s_per_step if row.s_per_step else None
        gpu_gb = None if row.peak_gpu_bytes is None else row.peak_gpu_bytes / 2**30
        cells.append([row.model + (" (tiny)" if tiny else ""), str(row.resolution), str(row.batch),
                      "on" if row.checkpointing else "off", row.compile_mode, row.attention,
                      row.error or fmt(row.s_per_step, 4), fmt(samples, 2), fmt(row.to_first_step_s, 1),
                      fmt(row.projected_1000_s, 1), flop,
                      "-" if mfu is None else f"{mfu:.1%}", fmt(gpu_gb, 1), *goal_cells(row, mfu, tiny)])
    return table(["model", "px", "batch", "grad ckpt", "compile", "attention", "s/step", "samples/s", "to step 1 s",
                  "1000 steps s",
                  "fwd TFLOP", "MFU", "peak GPU GB", "goal", "ratio to goal", "verdict"], cells)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    if args.device == "cpu" and not args.tiny and not 0 < args.resolution <= CPU_MAX_RESOLUTION:
        print(f"gpu_speed: full-size models on a CPU at their own size would take hours; add --tiny for the CPU dry "
              f"run, or --resolution {CPU_MAX_RESOLUTION // 2} to time compiling", file=sys.stderr)
        return 2
    if args.device == "cpu":
        threads = choose_threads(args.threads)
        if threads:
            torch.set_num_threads(threads)
    peak = peak_tflops(args)
    choices = {"off": [False], "on": [True], "both": [False, True]}
    checkpointing, compiling = choices[args.gradient_checkpointing], args.compile
    print(f"gpu_speed: {'tiny models' if args.tiny else 'full-size random-weight models'}, bf16, LoRA rank "
          f"{args.rank}, {args.steps} steps each (warm-up left out); {machine()}"
          + (f", {torch.get_num_threads()} torch thread(s)" if args.device == "cpu" else "")
          + (f"; bf16 peak {peak:.0f} TFLOP/s" if peak else ""), flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu-speed-") as tmp:
        if args.profile:
            print(profile_first(args, Path(tmp)), flush=True)
        for name in args.models:
            for batch in args.batches:
                for ckpt in checkpointing:
                    for variant in compiling:
                        reruns = [variant] + ([variant + WARM] if args.warm and variant != "off" else [])
                        cache = Path(tmp) / "compile-cache" / f"{name}-{batch}-{int(ckpt)}-{variant.replace(':', '-')}"
                        for mode in reruns:
                            rows.append(measure_with_fallback(name, batch, ckpt, args, Path(tmp), mode, cache, rows))
    print()
    print(results_table(rows, peak, args.tiny))
    sd15 = next((r for r in rows if r.model == "sd15" and r.batch == 1 and r.resolution == MODELS["sd15"][1]
                 and r.forward_flops), None)
    if sd15 is not None and not args.tiny:
        print(f"\nSD1.5 forward at batch 1, 512 px: {sd15.forward_flops / 1e12:.3f} TFLOP counted "
              f"(reference ~{SD15_REFERENCE_TFLOP} TFLOP)")
    if peak is None:
        print("MFU: unknown peak for this device (give --peak-tflops)")
    print("1000 steps s = steady-state s/step x 1000 (model build, latent caching and export not included)")
    save_results(RESULTS / ("gpu_speed_tiny.json" if args.tiny else "gpu_speed.json"),
                 {"settings": vars(args), "peak_tflops": peak, "rows": [vars(r) for r in rows]})
    return 1 if any(r.error.startswith("failed") for r in rows) else 0


class StepProfiler:
    """torch.profiler over a few steady steps (started and stopped by the loop's progress events): host and device
    time per operator, so launch overhead, synchronisation and slow kernels can be told apart."""

    def __init__(self, first_step: int, steps: int = 5):
        self.first_step, self.last_step = first_step, first_step + steps
        self.profiler = None

    def __call__(self, event: dict) -> None:
        if event["event"] != "progress":
            return
        if event["step"] == self.first_step:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities, record_shapes=False)
            self.profiler.start()
        elif event["step"] == self.last_step and self.profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.stop()

    def report(self, top: int = 25) -> str:
        if self.profiler is None:
            return "(no steps profiled)"
        averages = self.profiler.key_averages()
        steps = self.last_step - self.first_step
        device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        host_us = sum(a.self_cpu_time_total for a in averages)
        device_us = sum(getattr(a, device_key, 0) for a in averages) if torch.cuda.is_available() else 0
        lines = [f"{steps} steps: host (CPU) op time {host_us / steps / 1e3:.1f} ms/step, "
                 f"device kernel time {device_us / steps / 1e3:.1f} ms/step"]
        for key in ("self_cpu_time_total", device_key):
            lines.append(f"\nby {key}:")
            lines.append(averages.table(sort_by=key, row_limit=top, max_name_column_width=60))
        return "\n".join(lines)


def profile_first(args: argparse.Namespace, work: Path) -> str:
    """The first configuration once more, with a few steady steps under torch.profiler."""
    name, batch = args.models[0], args.batches[0]
    profiler = StepProfiler(first_step=max(args.warmup, 8) + 1)
    row = measure(name, batch, False, args, work, extra_callbacks=(profiler,))
    return f"profile of {name} batch {batch} ({row.error or fmt(row.s_per_step, 4) + ' s/step'}):\n{profiler.report()}\n"


COMPILE_MODES = ("reduce-overhead", "default", "max-autotune")
COMPILE_VARIANTS = ("off", *COMPILE_MODES, *(f"blocks:{mode}" for mode in COMPILE_MODES))


def _compile_modes(text: str) -> list[str]:
    aliases = {"on": ["reduce-overhead"], "both": ["off", "reduce-overhead"]}
    modes = [m for part in text.split(",") if part.strip() for m in aliases.get(part.strip(), [part.strip()])]
    unknown = [m for m in modes if m not in COMPILE_VARIANTS]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown compile variant(s) {', '.join(unknown) or '(none)'}; use "
                                         f"{', '.join(COMPILE_VARIANTS)}")
    return list(dict.fromkeys(modes))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny test models at 64 px instead of full size")
    parser.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                        default=list(MODELS), help="comma-separated: sd15,sdxl")
    parser.add_argument("--resolution", type=int, default=0,
                        help="image size in pixels instead of the model's own (512 SD1.5, 1024 SDXL, 64 with --tiny); "
                             "the goals apply only at the model's own size")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    parser.add_argument("--gradient-checkpointing", choices=("off", "on", "both"), default="off",
                        help="off (default; a run that runs out of memory is retried with it on), on, or both")
    parser.add_argument("--steps", type=int, default=0,
                        help="optimizer steps per measurement (default 40, or 12 with --tiny)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="first steps not timed, raised to one epoch of the 8 images (default 10)")
    parser.add_argument("--threads", default="auto",
                        help="torch threads with --device cpu: a number, or auto (1 on a busy machine)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16, the trainer's default)")
    parser.add_argument("--compile", type=_compile_modes, default=["off", "reduce-overhead"],
                        help="comma-separated variants side by side: off (eager), train.compile_mode values "
                             "(reduce-overhead, default, max-autotune) for the whole UNet, and the same prefixed "
                             "blocks: for compile_scope blocks; on = reduce-overhead, both = off,on "
                             "(default: off,reduce-overhead)")
    parser.add_argument("--warm", action="store_true",
                        help="run each compiled variant once more on the compile cache its first run left (what a "
                             "later run of the same model pays); every first run starts from an empty cache")
    parser.add_argument("--profile", action="store_true",
                        help="first run the first model and batch under cProfile and print where the time goes")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's dense bf16 peak, when its name is not in the built-in list")
    args = parser.parse_args(argv)
    args.steps = args.steps or (12 if args.tiny else 40)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; use {', '.join(MODELS)}")
    return args


if __name__ == "__main__":
    sys.exit(main())
