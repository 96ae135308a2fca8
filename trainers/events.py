"""The progress/sample/stop protocol that the CLI, the ComfyUI runner and TensorBoard all listen to.

The loop calls `EventLog.emit(event)` with one of the typed events of `runfolder`; every callback receives the same
dict. `StopSignal` is how a parent (a ComfyUI Cancel, Ctrl-C, a `STOP` file) asks the loop to stop at the next step
boundary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from .runfolder import (CheckpointEvent, DoneEvent, ErrorEvent, Event, PlanEvent, ProgressEvent, RunFolder,
                        SampleEvent, SavedEvent, StatusEvent, ValidationEvent)

log = logging.getLogger(__name__)


class Callback(Protocol):
    def __call__(self, event: dict[str, Any]) -> None: ...


class EventLog:
    """Fans each event out to callbacks and appends it to `events.jsonl` in the run folder."""

    def __init__(self, run_dir: Path | None = None, callbacks: list[Callback] | None = None, *, enabled: bool = True):
        self.callbacks: list[Callback] = list(callbacks or [])
        self.enabled = enabled
        self._file = None
        if run_dir is not None and enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(RunFolder(run_dir).events, "a", encoding="utf-8")

    def emit(self, typed: Event) -> dict[str, Any]:
        event = {"event": typed.EVENT, "time": round(time.time(), 3), **typed.fields()}
        if not self.enabled:
            return event
        if self._file is not None:
            try:
                self._file.write(json.dumps(event, default=str) + "\n")
                self._file.flush()
            except OSError as exc:  # a full disk: the listeners (the parent process) still hear of it
                log.warning("cannot append to events.jsonl (%s)", exc)
        for callback in self.callbacks:
            try:
                callback(event)
            except Exception:  # a broken listener must never stop training
                log.exception("event callback failed")
        return event

    def close(self) -> None:
        for callback in self.callbacks:
            close = getattr(callback, "close", None)
            if close:
                close()
        if self._file is not None:
            self._file.close()
            self._file = None


def print_json_lines(event: dict[str, Any], stream=None) -> None:
    """The `--events` protocol: one JSON object per line on stdout, flushed at once."""
    stream = stream or sys.stdout
    stream.write(json.dumps(event, default=str) + "\n")
    stream.flush()


def events_to_parent(stop: "StopSignal") -> Callable[[dict[str, Any]], None]:
    """`print_json_lines` for a parent process that reads stdout; when that pipe breaks (the parent died), the run
    is asked to stop with a checkpoint, and stdout goes nowhere from then on."""
    broken = False

    def printer(event: dict[str, Any]) -> None:
        nonlocal broken
        if broken:
            return
        try:
            print_json_lines(event)
        except (BrokenPipeError, ValueError, OSError):
            broken = True
            log.warning("the parent process stopped reading the events; stopping with a checkpoint")
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more fails at exit
            stop.request()

    return printer


def print_human(event: dict[str, Any]) -> None:
    kind = event["event"]
    if kind == ProgressEvent.EVENT:
        eta = event.get("eta_s")
        eta_text = f"{eta:.0f}s" if eta is not None else "?"
        print(f"step {event['step']}/{event['total']}  loss {event['loss']:.4f} (avg {event['loss_avg']:.4f})  "
              f"lr {event['lr']:.2e}  {event['it_s']:.2f} it/s  eta {eta_text}", flush=True)
    elif kind == PlanEvent.EVENT:
        print(event.get("text", ""), flush=True)
    elif kind in _PRINTED:
        fields = {k: v for k, v in event.items() if k not in ("event", "time")}
        print(f"[{kind}] {json.dumps(fields, default=str)}", flush=True)


_PRINTED = tuple(e.EVENT for e in (SavedEvent, CheckpointEvent, SampleEvent, ValidationEvent, DoneEvent, ErrorEvent,
                                    StatusEvent))

# Progress fields that are not training values; every other number in a progress event (a method's own values,
# e.g. DDPO's reward_mean or DreamBooth's loss_prior) is logged as `train/<name>`.
_PROGRESS_BOOKKEEPING = {"event", "time", *(f.name for f in dataclasses.fields(ProgressEvent) if f.name != "values")}


class TensorBoardWriter:
    """The event stream as TensorBoard logs (`output.tensorboard`): loss, smoothed loss, learning rates, the
    method's own values, validation loss and the sample images, at the steps of their events. A no-op with one
    log line when tensorboard is not installed.

    torch's SummaryWriter rather than accelerate's trackers: as a listener of the events it logs exactly what
    events.jsonl and the ComfyUI chart show, and the loop keeps one place where numbers are reported."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed; TensorBoard logs are off (pip install tensorboard)")
            self._summary_writer = None
            return
        self._summary_writer = SummaryWriter

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if self._summary_writer is None or kind not in (ProgressEvent.EVENT, ValidationEvent.EVENT, SampleEvent.EVENT):
            return
        step = event["step"]
        if self.writer is None:
            # A resumed run starts at a later step: what an earlier process logged from there on is dropped.
            self.writer = self._summary_writer(str(self.log_dir), purge_step=step)
        if kind == ProgressEvent.EVENT:
            self._progress(event, step)
        elif kind == ValidationEvent.EVENT:
            self.writer.add_scalar("loss/validation", event["loss"], step)
        else:
            self._samples(event["paths"], step)
        self.writer.flush()

    def _progress(self, event: dict[str, Any], step: int) -> None:
        self.writer.add_scalar("loss/train", event["loss"], step)
        self.writer.add_scalar("loss/train_avg", event["loss_avg"], step)
        self.writer.add_scalar("lr", event["lr"], step)
        for group, lr in enumerate(event.get("lrs", [])[1:], start=1):
            self.writer.add_scalar(f"lr/group_{group}", lr, step)
        for name, value in event.items():
            if name not in _PROGRESS_BOOKKEEPING and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{name}", value, step)

    def _samples(self, paths: list[str], step: int) -> None:
        import numpy as np
        from PIL import Image

        for n, path in enumerate(paths):
            with Image.open(path) as image:
                self.writer.add_image(f"samples/{n}", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_listeners(run_dir: Path, enabled: bool) -> list[Callback]:
    """The TensorBoard writer for `<run>/tensorboard/`, when `output.tensorboard` is on (and on the main process)."""
    return [TensorBoardWriter(RunFolder(run_dir).tensorboard)] if enabled else []


class StopSignal:
    """A stop request: set in-process (`request()`), by SIGINT/SIGTERM, or by a `STOP` file in the run folder."""

    def __init__(self, run_dir: Path | None = None, *, since: float | None = None):
        self._event = threading.Event()
        self.stop_file = RunFolder(run_dir).stop if run_dir is not None else None
        self.external_check: Callable[[], bool] | None = None
        self.since = time.time() if since is None else since
        """When this run began: a STOP file written later is a request for it (a Cancel during start-up)."""

    def request(self) -> None:
        self._event.set()

    def requested(self) -> bool:
        if self._event.is_set():
            return True
        if self.stop_file is not None and self.stop_file.exists():
            self._event.set()
        elif self.external_check is not None and self.external_check():
            self._event.set()
        return self._event.is_set()

    def clear(self) -> None:
        self._event.clear()
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def clear_stale(self) -> None:
        """Remove a STOP file left from an earlier run; one written since this run began stays and stops it."""
        try:
            if self.stop_file is not None and self.stop_file.stat().st_mtime < self.since:
                self.stop_file.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def stop_when_orphaned(self) -> None:
        """Also stop when the parent process is gone (the trainer is then re-parented, so its parent id changes):
        a program that drives the trainer and dies must not leave it training on with the GPU held."""
        parent = os.getppid()
        previous = self.external_check
        self.external_check = lambda: os.getppid() != parent or bool(previous and previous())

    def install_signal_handlers(self) -> None:
        """First Ctrl-C/SIGTERM: stop after this step with a checkpoint. A second one: the default behaviour."""

        def handler(signum, frame):
            if self._event.is_set():
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            self._event.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread
                pass


class Throughput:
    """Steps per second and ETA over a sliding window, ignoring the slow first steps."""

    def __init__(self, window: int = 20):
        self.window = window
        self.times: list[float] = []

    def tick(self) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > self.window + 1:
            self.times.pop(0)

    def rate(self) -> float:
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)

    def eta(self, remaining_steps: int) -> float | None:
        rate = self.rate()
        return remaining_steps / rate if rate > 0 else None
