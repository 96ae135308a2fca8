"""The one training loop. Every method runs through it:

config → data → base model → method setup → optimizer → (resume) → steps with callbacks → export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler

from .checkpointing import LoopState, Resumables, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .data.captions import tag_frequency
from .data.dataset import BucketBatchSampler, TrainingDataset, collate
from .errors import ConfigError, DiskFullError, FinetuneError, NonFiniteLoss
from .evaluate import heldout_loss
from .events import EventLog, StopSignal, Throughput, tensorboard_listeners
from .io import is_disk_full
from .methods import Method, RunSummary
from .model_setup import setup_method
from .models.loading import load_base_model
from .optimizers import evaluation_weights, make_optimizer, scheduler_name, scheduler_warmup
from .plan import Plan, make_plan
from .runfolder import (DONE_CONFIG, DONE_MODEL, DONE_SAMPLE_PREFIX, STOPPED, SUCCEEDED, CheckpointEvent, DoneEvent,
                        ErrorEvent, PlanEvent, ProgressEvent, RunFolder, SampleEvent, SavedEvent, StatusEvent,
                        ValidationEvent)
from .sampling import SamplingInterrupted, generate_images, save_samples


@dataclass
class TrainResult:
    status: str  # "succeeded" | "stopped"
    run_dir: Path
    steps_done: int
    outputs: dict[str, str] = field(default_factory=dict)
    final_loss: float | None = None


class DataStream:
    """Endless batches in a reproducible order: the position is a pure function of the micro-step count."""

    def __init__(self, dataset: TrainingDataset, sampler: BucketBatchSampler, micro_step: int = 0):
        self.dataset, self.sampler = dataset, sampler
        self._micro_step = micro_step
        self._epoch, self._batches = -1, []
        self._ready: dict[str, Any] | None = None

    @property
    def micro_step(self) -> int:
        """Micro-batches handed out so far (a prefetched batch does not count until `next` returns it)."""
        return self._micro_step

    @micro_step.setter
    def micro_step(self, value: int) -> None:
        self._micro_step, self._ready = value, None

    def next(self) -> dict[str, Any]:
        self.prefetch()
        batch, self._ready = self._ready, None
        self._micro_step += 1
        return batch

    def prefetch(self) -> None:
        """Build the next batch now, while the GPU still works on the step just queued."""
        if self._ready is None:
            self._ready = self._make()

    def _make(self) -> dict[str, Any]:
        epoch, position = divmod(self._micro_step, len(self.sampler))
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.sampler.batches_for_epoch(epoch)
            self.dataset.set_epoch(epoch)
        return collate([self.dataset[i] for i in self._batches[position]])


def choose_mixed_precision(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if requested == "fp16" and not torch.cuda.is_available():
        raise ConfigError("fp16 needs a CUDA GPU", "use bf16 or no on the CPU", where="train.mixed_precision")
    return requested


def _make_accelerator(mixed_precision: str) -> Accelerator:
    # accelerate keeps one process-wide state and refuses a second precision in the same process; a single-process
    # caller (a notebook, a test) training twice with different precisions gets a fresh state instead.
    shared = AcceleratorState._shared_state
    if shared and shared.get("distributed_type") == DistributedType.NO and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def train(cfg: Config, *, resume: bool = False, callbacks: list | None = None, stop: StopSignal | None = None,
          accelerator: Accelerator | None = None) -> TrainResult:
    """Run one training to the end or to a stop request. User-fixable problems raise FinetuneError (also reported
    as an `error` event); the run folder keeps the config, events, checkpoints, samples and the result."""
    plan = make_plan(cfg)
    accelerator = accelerator or _make_accelerator(choose_mixed_precision(plan.cfg.train.mixed_precision))
    stop = stop or StopSignal(plan.run_dir)
    if accelerator.is_main_process:
        _claim_run_dir(plan.run_dir, plan.cfg, resume, stop)
        plan.cfg.save(RunFolder(plan.run_dir).config)
    accelerator.wait_for_everyone()
    listeners = [*(callbacks or []), *tensorboard_listeners(
        plan.run_dir, plan.cfg.output.tensorboard and accelerator.is_main_process)]
    events = EventLog(plan.run_dir, listeners, enabled=accelerator.is_main_process)
    try:
        return _train(plan, resume, events, stop, accelerator)
    except FinetuneError as exc:
        events.emit(ErrorEvent(str(exc), exc.where))
        exc.reported = True
        raise
    except Exception as exc:
        if is_disk_full(exc):  # a write the io helpers do not wrap (torch.save of samples, logs...)
            full = DiskFullError(Path(exc.filename).parent if getattr(exc, "filename", None) else plan.run_dir)
            events.emit(ErrorEvent(str(full), full.where))
            full.reported = True
            raise full from None
        events.emit(ErrorEvent(f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        events.close()


@dataclass
class Training:
    """What the loop's phases share: the run's parts, built once by `_prepare`, and where the run stands."""

    plan: Plan
    accelerator: Accelerator
    events: EventLog
    stop: StopSignal
    base: Any
    method: Method
    optimizer: Any
    lr_scheduler: Any
    wrapped: dict[str, torch.nn.Module]
    """The trained modules as accelerate prepared them."""
    trainable: list[torch.Tensor]
    generator: torch.Generator
    state: LoopState = field(default_factory=LoopState)
    last_checkpoint: Path | None = None
    stream: Any = None
    prior_stream: DataStream | None = None
    summary: RunSummary | None = None
    throughput: Throughput = field(default_factory=Throughput)

    @property
    def cfg(self) -> Config:
        return self.plan.cfg

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.plan.run_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def resumables(self) -> Resumables:
        return Resumables(self.optimizer, self.lr_scheduler, self.generator, scaler=self.accelerator.scaler)


def _train(plan: Plan, resume: bool, events: EventLog, stop: StopSignal, accelerator: Accelerator) -> TrainResult:
    events.emit(PlanEvent(plan.summary()))
    t = _prepare(plan, events, stop, accelerator)
    if resume:
        _resume(t)
    _open_streams(t)
    t.throughput.tick()
    while t.state.step < t.cfg.train.steps:
        if _stop_requested(stop, accelerator):
            return _stopped(t)
        if _step(t):
            with _eager(t.cfg):
                _periodic(t)
    return _finish(t)


# ---- phases: before the first step ----------------------------------------------------------------------------
def _prepare(plan: Plan, events: EventLog, stop: StopSignal, accelerator: Accelerator) -> Training:
    """The base model, the method on it, the optimizer and scheduler, all placed and wrapped by accelerate."""
    cfg = plan.cfg
    torch.manual_seed(cfg.train.seed)  # identical adapter initialisation on every process
    method, plan = _load_method(plan, accelerator)
    base = method.base
    groups = method.parameter_groups()
    optimizer = make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(scheduler_name(cfg), optimizer, num_warmup_steps=scheduler_warmup(cfg),
                                 num_training_steps=cfg.train.steps)
    wrapped = {name: accelerator.prepare(module) for name, module in method.trained_modules().items()}
    method.wrap(wrapped)
    if cfg.train.compile:
        _compile_training_forward(cfg, method, base.unet)
    optimizer = accelerator.prepare(optimizer)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed + accelerator.process_index)
    trainable = [p for group in groups for p in group["params"]]
    return Training(plan, accelerator, events, stop, base, method, optimizer, lr_scheduler, wrapped, trainable,
                    generator)


def _load_method(plan: Plan, accelerator: Accelerator) -> tuple[Method, Plan]:
    """The base model and the method on it, placed on the device (`model_setup`), and the datasets it reads."""
    cfg = plan.cfg
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    base = load_base_model(cfg.model, dtype=weight_dtype)
    static_pixels = plan.dataset is not None and plan.dataset.pixels_are_static
    method = setup_method(cfg, base, accelerator.device, weight_dtype, static_pixels=static_pixels)
    if plan.dataset is not None:  # the datasets as the method reads them
        plan = dataclasses.replace(plan, dataset=method.prepare_dataset(plan.dataset), validation=(
            method.prepare_dataset(plan.validation) if plan.validation is not None else None))
    return method, plan


def _resume(t: Training) -> None:
    """Continue from the newest complete checkpoint, when there is one."""
    checkpoint = latest_checkpoint(t.plan.run_dir)
    if checkpoint is None:
        return
    t.state, trainable_state, extra = load_checkpoint(checkpoint, t.resumables, rank=t.accelerator.process_index)
    t.method.load_trainable_state(trainable_state)
    t.method.load_extra_state(extra)
    t.last_checkpoint = checkpoint
    t.events.emit(StatusEvent(f"resumed from {checkpoint.name}", t.state.step))


def _open_streams(t: Training) -> None:
    """The batches from the state's position on (the method's own, or the dataset's), and the class images."""
    cfg, accelerator, plan = t.cfg, t.accelerator, t.plan
    t.stream = t.method.data_stream(t.state.micro_step, t.generator)
    if t.stream is None:
        sampler = BucketBatchSampler(plan.dataset, cfg.train.batch_size, seed=cfg.train.seed,
                                     num_replicas=accelerator.num_processes, rank=accelerator.process_index)
        t.stream = DataStream(plan.dataset, sampler, t.state.micro_step)
    with _eager(cfg):
        t.prior_stream = _prior_stream(cfg, t.base, accelerator, t.events, t.state.micro_step, t.stop)
    if accelerator.num_processes == 1:  # with several processes a stop is only agreed on between steps
        t.method.should_stop = t.stop.requested
    t.summary = RunSummary(steps_done=t.state.step, num_images=plan.scan.num_images,
                           tag_frequency=tag_frequency([item.caption for item in plan.scan.items]),
                           started_at=time.time())


# ---- phases: one step ----------------------------------------------------------------------------------------
def _step(t: Training) -> bool:
    """One optimizer step and its progress event; False when a stop interrupted it (nothing of it is kept)."""
    t.method.train_mode(True)
    start = _positions(t)
    try:
        step_loss, logs = _accumulate(t.method, t.stream, t.prior_stream, t.wrapped, t.method.micro_steps_per_step(),
                                      t.accelerator, t.generator, compiled=t.cfg.train.compile)
    except SamplingInterrupted:
        # The stop came while the step was still sampling (DDPO): drop the partial step, stop after the last whole
        # one (the loop checkpoints it next).
        _rewind(t, start)
        t.optimizer.zero_grad(set_to_none=True)
        return False
    _apply_gradients(t)
    for upcoming in (t.stream, t.prior_stream):
        if isinstance(upcoming, DataStream):
            upcoming.prefetch()
    # The step's one wait for the GPU, after all of it is queued. A non-finite loss has reached the weights in
    # memory by now, but nothing after the last checkpoint is ever written.
    step_loss, logs = float(step_loss), {k: float(v) for k, v in logs.items()}
    _check_finite(t, step_loss)
    _record_step(t, step_loss, logs)
    return True


def _positions(t: Training) -> tuple[int, int]:
    return t.stream.micro_step, t.prior_stream.micro_step if t.prior_stream is not None else 0


def _rewind(t: Training, positions: tuple[int, int]) -> None:
    t.stream.micro_step = positions[0]
    if t.prior_stream is not None:
        t.prior_stream.micro_step = positions[1]


def _apply_gradients(t: Training) -> None:
    if t.cfg.train.max_grad_norm > 0 and t.accelerator.sync_gradients:
        t.accelerator.clip_grad_norm_(t.trainable, t.cfg.train.max_grad_norm)
    t.optimizer.step()
    t.lr_scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.method.after_optimizer_step()


def _check_finite(t: Training, step_loss: float) -> None:
    if not math.isfinite(step_loss):
        step = t.state.step
        raise NonFiniteLoss(
            f"the loss became {step_loss} at step {step + 1}; nothing after step {step} was saved "
            f"(last good checkpoint: {t.last_checkpoint or 'none'})",
            "lower train.learning_rate, or use train.mixed_precision bf16 or no (fp16 overflows)", where="train")


def _record_step(t: Training, step_loss: float, logs: dict[str, float]) -> None:
    state, total = t.state, t.cfg.train.steps
    state.step += 1
    t.throughput.tick()
    state.loss_avg = step_loss if state.step == 1 else 0.95 * state.loss_avg + 0.05 * step_loss
    lrs = t.lr_scheduler.get_last_lr()
    t.events.emit(ProgressEvent(state.step, total, step_loss, state.loss_avg, lrs[0], lrs, t.throughput.rate(),
                                t.throughput.eta(total - state.step), logs))


# ---- phases: between steps and at the end ----------------------------------------------------------------------
def _periodic(t: Training) -> None:
    """What `output.*_every` asks for after this step: checkpoints on every process, the rest on the main one."""
    out, step = t.cfg.output, t.state.step
    last = step == t.cfg.train.steps
    if out.checkpoint_every and step % out.checkpoint_every == 0 and not last:
        _checkpoint(t)
    if not t.is_main:
        return
    with evaluation_weights(t.optimizer):
        _export_sample_validate(t, last)


def _export_sample_validate(t: Training, last: bool) -> None:
    """On the main process, with the weights samples and exports should see (schedule-free's averaged ones)."""
    out, step = t.cfg.output, t.state.step
    if out.save_every and step % out.save_every == 0 and not last:
        _save_intermediate(t)
    if out.sample_prompts and ((out.sample_every and step % out.sample_every == 0) or last):
        _sample(t)
    if t.plan.validation is not None and ((out.validation_every and step % out.validation_every == 0) or last):
        t.method.train_mode(False)
        t.events.emit(ValidationEvent(step, heldout_loss(t.method, t.plan.validation)))


def _checkpoint(t: Training) -> None:
    """Every process calls this: save_checkpoint waits for all of them."""
    t.state.micro_step = t.stream.micro_step
    t.last_checkpoint = save_checkpoint(t.plan.run_dir, t.state, t.method, t.resumables, t.accelerator,
                                        keep=t.cfg.output.keep_checkpoints)
    t.events.emit(CheckpointEvent(t.state.step, str(t.last_checkpoint)))


def _save_intermediate(t: Training) -> None:
    step, method = t.state.step, t.method
    t.summary.steps_done, t.summary.finished_at = step, time.time()
    path = method.export(t.run.intermediate / f"{t.cfg.output.name}_step{step:06d}{method.export_suffix}",
                         t.summary, overwrite=True)
    t.events.emit(SavedEvent(step, str(path), f"{method.name}-intermediate"))


def _sample(t: Training) -> None:
    out, cfg = t.cfg.output, t.cfg
    t.method.train_mode(False)
    try:
        with t.method.sampling_context():
            images = generate_images(t.base, list(out.sample_prompts), steps=out.sample_steps,
                                     guidance=out.sample_guidance, seed=out.sample_seed, width=cfg.data.resolution,
                                     height=cfg.data.resolution, should_stop=t.method.should_stop)
    except SamplingInterrupted:
        images = []  # a stop is waiting: the samples are skipped, the loop checkpoints next
    if images:
        t.events.emit(SampleEvent(t.state.step, [str(p) for p in save_samples(images, t.run, t.state.step)]))


def _stopped(t: Training) -> TrainResult:
    _checkpoint(t)
    t.events.emit(DoneEvent(STOPPED, t.state.step, checkpoint=str(t.last_checkpoint)))
    return TrainResult(STOPPED, t.plan.run_dir, t.state.step, final_loss=t.state.loss_avg)


def _finish(t: Training) -> TrainResult:
    """The last checkpoint on every process; the export, its event and the `done` event on the main one."""
    t.accelerator.wait_for_everyone()
    in_sync = _replicas_in_sync(t.trainable, t.accelerator)
    _checkpoint(t)
    outputs: dict[str, str] = {}
    if t.is_main:
        outputs = _export(t)
        t.events.emit(DoneEvent(SUCCEEDED, t.state.step, outputs=outputs, processes=t.accelerator.num_processes,
                                replicas_in_sync=in_sync))
    return TrainResult(SUCCEEDED, t.plan.run_dir, t.state.step, outputs, final_loss=t.state.loss_avg)


def _export(t: Training) -> dict[str, str]:
    step, run = t.state.step, t.run
    t.summary.steps_done, t.summary.finished_at = step, time.time()
    with evaluation_weights(t.optimizer):
        path = t.method.export(export_path(t.cfg, t.plan.run_dir, t.method), t.summary,
                               overwrite=t.cfg.output.overwrite)
    t.events.emit(SavedEvent(step, str(path), t.method.name))
    outputs = {DONE_MODEL: str(path), DONE_CONFIG: str(run.config)}
    outputs.update({f"{DONE_SAMPLE_PREFIX}{n}": str(p) for n, p in enumerate(run.samples_at(step))})
    return outputs


def _compile_training_forward(cfg: Config, method: Method, unet: torch.nn.Module) -> None:
    mode = cfg.train.compile_mode
    if cfg.train.compile_scope == "unet":
        # The module itself stays the eager one: parameter names (checkpoints, export) and sample images are untouched.
        method.unet_forward = torch.compile(method.unet_forward, mode=mode)
        return
    if not getattr(unet, "_repeated_blocks", None):
        raise ConfigError("compile_scope blocks needs a diffusers release that knows the UNet's repeated blocks",
                          "upgrade diffusers, or use compile_scope unet", where="train.compile_scope")
    # Compiled in place (names unchanged); every forward outside the training step runs under _eager.
    unet.compile_repeated_blocks(mode=mode)


def _eager(cfg: Config):
    """Sample images, held-out loss and class images run the UNet eager: compiling them would cost more graphs (no
    gradients, other batch sizes) than it saves."""
    return torch.compiler.set_stance("force_eager") if cfg.train.compile else contextlib.nullcontext()


def _accumulate(method: Method, stream, prior_stream, wrapped: dict, accum: int, accelerator: Accelerator,
                generator: torch.Generator, *, compiled: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward and backward over the step's micro-batches; gradients are synchronised on the last one only. The
    loss stays on the device (reading it would make the host wait for the GPU in the middle of the step)."""
    step_loss, logs = torch.zeros((), device=accelerator.device), {}
    for micro in range(accum):
        batch = _to_device(stream.next(), accelerator.device)
        if prior_stream is not None:
            batch["prior"] = _to_device(prior_stream.next(), accelerator.device)
        with contextlib.ExitStack() as stack:
            if micro < accum - 1:
                for module in wrapped.values():
                    stack.enter_context(accelerator.no_sync(module))
            stack.enter_context(accelerator.autocast())
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()  # the last micro-step's graph outputs are no longer read
            loss, logs = method.compute_loss(batch, generator)
            accelerator.backward(loss / accum)
        step_loss = step_loss + loss.detach().float() / accum
    return step_loss, logs


def export_path(cfg: Config, run_dir: Path, method: Method) -> Path:
    return Path(cfg.output.export_path) if cfg.output.export_path else run_dir / f"{cfg.output.name}{method.export_suffix}"


def _prior_stream(cfg, base, accelerator, events, micro_step: int, stop: StopSignal) -> DataStream | None:
    """Class images for prior preservation; None without it, or when a stop came while they were generated (the
    stop is then honoured at the top of the loop, and the images made so far are kept for the resumed run)."""
    if not (cfg.dreambooth.enabled and cfg.dreambooth.prior_preservation):
        return None
    from .dreambooth import class_dataset, ensure_class_images

    cache_root = Path(cfg.output.dir) / ".class_images"
    interrupted = False
    if accelerator.is_main_process:
        try:
            ensure_class_images(cfg, base, cache_root, should_stop=stop.requested, on_progress=lambda done, total:
                                events.emit(StatusEvent(f"generating class images {done}/{total}", 0)))
        except SamplingInterrupted:
            interrupted = True
    accelerator.wait_for_everyone()
    if interrupted:
        return None
    paths = ensure_class_images(cfg, base, cache_root)  # all present now: a cheap scan on every process
    dataset = class_dataset(cfg, paths)
    sampler = BucketBatchSampler(dataset, cfg.train.batch_size, seed=cfg.train.seed + 1,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    return DataStream(dataset, sampler, micro_step)


def _stop_requested(stop: StopSignal, accelerator: Accelerator) -> bool:
    wanted = stop.requested()
    if accelerator.num_processes == 1:
        return wanted
    flag = torch.tensor([1.0 if wanted else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _replicas_in_sync(params: list[torch.Tensor], accelerator: Accelerator) -> bool:
    """Every process must end with the same weights; a difference means gradients were not synchronised."""
    if accelerator.num_processes == 1:
        return True
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    gathered = accelerator.gather(checksum)
    return bool(torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-9))


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    # Pixels stay on the host: the VAE encoder moves the few it needs (none once the latents are cached).
    return {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "pixels" else v) for k, v in batch.items()}


def _claim_run_dir(run_dir: Path, cfg: Config, resume: bool, stop: StopSignal) -> None:
    run = RunFolder(run_dir)
    exists = run.config.exists()
    if exists and not resume and not cfg.output.overwrite:
        raise FinetuneError("a run with this name already exists",
                            "pass --resume to continue it, choose another output.name, or set output.overwrite",
                            where=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    stop.clear_stale()
    if not resume:
        run.events.unlink(missing_ok=True)
