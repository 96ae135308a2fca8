"""Training speed and memory on a CPU, side by side: our trainer with and without caching, and ComfyUI's native
`TrainLoraNode` through a real ComfyUI server, on the same tiny SD1.5, images, steps, rank, learning rate and batch.

    python bench/train_speed.py [--steps 28] [--warmup 8] [--repeats 2] [--threads auto] [--algorithms loha,lokr,dora]
                                [--profile]

The variants run interleaved (their order rotates every repeat) so that a busy machine slows them alike; each
number is the median over the repeats, and the CPU time per step is reported beside the wall time. Goal: our cached
trainer at most half the native seconds per step, with no more peak memory. A row per other adapter algorithm
(cached, same rank and targets) shows its s/step and memory against our LoRA. When the goal is missed (or with
--profile), one more cached run under cProfile shows where the time goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import RESULTS
from harness.measure import choose_threads, median, rss_while_stepping, steady_s_per_step
from harness.native_trainer import NativeRun, run_native
from harness.our_trainer import Setup, TrainerRun, run_trainer, trainer_env, trainer_floor_rss, write_config
from harness.profiling import cprofile_prefix, summarize
from harness.report import fmt, fmt_mb, machine, ratio, save_results, table

OURS_CACHED, OURS_UNCACHED, NATIVE = "ours, cached latents + text", "ours, no caching", "ComfyUI TrainLoraNode"
SPEED_GOAL = 0.5
"""Our cached s/step over native s/step, at most."""


@dataclass
class Variant:
    name: str
    s_per_step: list[float | None] = field(default_factory=list)
    cpu_s_per_step: list[float | None] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    floor_rss: list[int] = field(default_factory=list)
    stepping_rss: list[int | None] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)

    def add(self, run: TrainerRun | NativeRun, warmup: int, floor: int) -> None:
        self.s_per_step.append(steady_s_per_step(run.step_stamps, warmup))
        self.cpu_s_per_step.append(steady_s_per_step(run.cpu_stamps, warmup))
        self.peak_rss.append(run.peak_rss)
        self.floor_rss.append(floor)
        self.stepping_rss.append(rss_while_stepping(run.watcher, run.step_stamps, warmup) if run.watcher else None)
        self.wall_s.append(run.wall_s)

    @property
    def step(self) -> float | None:
        return median(self.s_per_step)

    @property
    def cpu_step(self) -> float | None:
        return median(self.cpu_s_per_step)

    @property
    def peak(self) -> int | None:
        return max(self.peak_rss) if self.peak_rss else None

    @property
    def training_rss(self) -> int | None:
        """Peak over the process's floor: what loading the model and training added."""
        deltas = [p - f for p, f in zip(self.peak_rss, self.floor_rss)]
        return max(deltas) if deltas else None

    @property
    def stepping_over_floor(self) -> int | None:
        """Highest RSS during the timed steps, over the floor: the working set of training itself."""
        deltas = [s - f for s, f in zip(self.stepping_rss, self.floor_rss) if s is not None]
        return max(deltas) if deltas else None

    def summary(self) -> dict[str, float | None]:
        return {"s_per_step": self.step, "cpu_s_per_step": self.cpu_step, "peak_rss_mb": _mb(self.peak),
                "training_rss_mb": _mb(self.training_rss), "while_stepping_mb": _mb(self.stepping_over_floor)}


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warmup >= args.steps - 1:
        sys.exit(f"--warmup ({args.warmup}) must leave at least 2 measured steps of --steps ({args.steps})")
    work = RESULTS / "train_speed"
    shutil.rmtree(work, ignore_errors=True)
    setup = prepare_setup(args, work)
    threads = choose_threads(args.threads)
    env = trainer_env(threads)
    configs = {
        OURS_CACHED: write_config(work / "cached.json", setup, run_root=work / "runs", name="cached", cache=True),
        OURS_UNCACHED: write_config(work / "uncached.json", setup, run_root=work / "runs", name="uncached",
                                    cache=False),
    }
    for algorithm in args.algorithms:
        configs[algorithm_variant(algorithm)] = write_config(work / f"{algorithm}.json", setup, run_root=work / "runs",
                                                             name=algorithm, cache=True, lora={"algorithm": algorithm})
    print(f"train_speed: {args.images} images {args.size}x{args.size}, rank {args.rank}, batch {args.batch}, fp32, "
          f"{args.steps} steps (the first {args.warmup} not timed), {args.repeats} repeat(s); {machine()}; "
          f"{threads or 'default'} thread(s) per trainer, load average {os.getloadavg()[0]:.1f}", flush=True)
    variants = run_interleaved(args, setup, configs, env, work)

    native = variants.get(NATIVE)
    print()
    print(results_table(variants, native, args.batch))
    met = report_goal(variants[OURS_CACHED], native, args)
    save_results(RESULTS / "train_speed.json", {
        "settings": vars(args), "goal_met": met, "summary": {name: v.summary() for name, v in variants.items()},
        "runs": {name: asdict(v) for name, v in variants.items()}})
    if args.profile or met is False:
        print("\nWhere our cached trainer spends its time (one run under cProfile, which adds some overhead):")
        stats = work / "cached.prof"
        run_trainer(configs[OURS_CACHED], work / "cached-profile.log", env, prefix=cprofile_prefix(stats))
        print(summarize(stats, args.steps))
    return 0


def run_interleaved(args: argparse.Namespace, setup: Setup, configs: dict[str, Path], env: dict[str, str],
                    work: Path) -> dict[str, Variant]:
    """Every variant once per repeat, the order rotating, so a machine that gets busier slows them alike."""
    order = list(configs) + ([] if args.skip_native else [NATIVE])
    variants = {name: Variant(name) for name in order}
    floor = trainer_floor_rss(env)
    if not args.skip_native:
        from tests.comfy.server import prepare_host, tiny_checkpoint_name

        comfy = prepare_host(("sd1",))
        checkpoint_name = tiny_checkpoint_name(comfy, "sd1")
        native_env = {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in env}
    for repeat in range(args.repeats):
        shift = repeat % len(order)
        for name in order[shift:] + order[:shift]:
            print(f"  repeat {repeat + 1}/{args.repeats}: {name} ...", flush=True)
            if name == NATIVE:
                run = run_native(comfy, checkpoint_name, setup, work / "native",
                                 gradient_checkpointing=args.native_gradient_checkpointing, extra_env=native_env)
                if not variants[name].wall_s:
                    print(f"    ComfyUI {run.comfyui_version}'s TrainLoraNode; inputs left at its defaults: "
                          f"{run.defaulted or 'none'}", flush=True)
                variants[name].add(run, args.warmup, run.floor_rss)
            else:
                run = run_trainer(configs[name], work / f"{configs[name].stem}.log", env)
                variants[name].add(run, args.warmup, floor)
            done = variants[name]
            print(f"    {fmt(done.s_per_step[-1])} s/step ({fmt(done.cpu_s_per_step[-1])} CPU s/step), peak RSS "
                  f"{fmt_mb(done.peak_rss[-1])} MB, wall {done.wall_s[-1]:.0f} s", flush=True)
    return variants


def prepare_setup(args: argparse.Namespace, work: Path) -> Setup:
    from tests.unit.train_helpers import make_images
    from tiny_models import comfy_checkpoint

    images = make_images(work / "images", count=args.images, size=args.size)
    return Setup(checkpoint=comfy_checkpoint("sd1"), images=images, steps=args.steps, rank=args.rank,
                 learning_rate=args.lr, batch_size=args.batch, resolution=args.size)


def results_table(variants: dict[str, Variant], native: Variant | None, batch: int) -> str:
    rows = []
    lora = variants[OURS_CACHED]
    for v in variants.values():
        samples = batch / v.step if v.step else None
        rows.append([v.name, fmt(v.step), fmt(samples, 2), fmt(v.cpu_step), fmt_mb(v.peak), fmt_mb(v.training_rss),
                     fmt_mb(v.stepping_over_floor), ratio(v.step, native.step if native else None),
                     ratio(v.cpu_step, native.cpu_step if native else None),
                     ratio(v.training_rss, native.training_rss if native else None),
                     ratio(v.step, lora.step), ratio(v.training_rss, lora.training_rss)])
    return table(["variant", "s/step", "samples/s", "CPU s/step", "peak RSS MB", "training RSS MB",
                  "while stepping MB", "s/step vs native", "CPU s/step vs native", "training RSS vs native",
                  "s/step vs our LoRA", "training RSS vs our LoRA"], rows)


def algorithm_variant(algorithm: str) -> str:
    return f"ours, cached, {algorithm}"


def report_goal(ours: Variant, native: Variant | None, args: argparse.Namespace) -> bool | None:
    print("\nCPU s/step = CPU time the training process used per step (robust to a busy machine, where wall time "
          "also counts the wait for a core). training RSS = peak RSS minus the same process before it loads anything "
          "(our trainer: an interpreter with its imports; ComfyUI: the started server just before the prompt); while "
          "stepping = the highest RSS polled during the timed steps, minus the same floor (no model-loading "
          "transient).")
    print(f"native: gradient checkpointing {'on (the node default)' if args.native_gradient_checkpointing else 'off'}, "
          "LoRA on every linear/conv layer plus bias/norm offsets (its only mode); ours: LoRA on attention (our "
          "default targets).")
    if native is None or native.step is None or ours.step is None:
        print("goal: not judged (the native trainer was not run)")
        return None
    speeds = [r for r in (ours.step / native.step, _safe_ratio(ours.cpu_step, native.cpu_step)) if r is not None]
    speed_ok = all(r <= SPEED_GOAL for r in speeds)
    speed_disputed = not speed_ok and any(r <= SPEED_GOAL for r in speeds)
    memory = _safe_ratio(ours.training_rss, native.training_rss)
    memory_ok = memory is not None and memory <= 1.0
    met = speed_ok and memory_ok
    speed_text = "met" if speed_ok else "disputed: wall and CPU time disagree" if speed_disputed else "not met"
    print(f"goal: s/step <= {SPEED_GOAL}x native: {speed_text} (wall {speeds[0]:.2f}x"
          + (f", CPU {speeds[1]:.2f}x" if len(speeds) > 1 else "") + f"); training RSS <= native: "
          f"{'met' if memory_ok else 'not met'} ({fmt(memory)}x: {fmt_mb(ours.training_rss)} vs "
          f"{fmt_mb(native.training_rss)} MB). Overall: {'MET' if met else 'NOT MET'}")
    return met


def _safe_ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=28, help="optimizer steps per run (default 28)")
    parser.add_argument("--warmup", type=int, default=8,
                        help="first steps left out of the timing; the default is one epoch of 8 images, during which "
                             "our cached variant fills its latent cache (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved (default 2)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", default="auto",
                        help="torch threads of every trainer: a number, 0 for torch's own choice, or auto (default): "
                             "1 when the machine is busier than its cores, where threads mostly wait for each other")
    parser.add_argument("--native-gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="the native node's gradient_checkpointing input (default on, the node's default)")
    parser.add_argument("--skip-native", action="store_true", help="only our two variants (no ComfyUI server)")
    parser.add_argument("--profile", action="store_true", help="profile our cached trainer even when the goal is met")
    parser.add_argument("--algorithms", default="loha,lokr,dora", type=lambda text: [a for a in text.split(",") if a],
                        help="adapter algorithms measured beside LoRA, cached (default loha,lokr,dora; empty for none)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
