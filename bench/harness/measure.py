"""Step time and peak memory, measured the same way for every trainer.

Step time: the moment each optimizer step is reported (a progress event of ours, a progress message of ComfyUI's),
taken by the benchmark's clock, and the CPU time the training process had used by then; the steady state leaves out
the first `warmup` steps (model warm-up, the first epoch that fills the latent cache). Memory: the peak resident set
size (RSS) of the process that trains.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil


def busy_machine() -> bool:
    """More runnable work than cores over the last minute: then two torch threads per process mostly wait for each
    other (a 64x64 matmul measured 57 ms with 2 threads against 0.01 ms with 1 on such a machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return hasattr(os, "getloadavg") and os.getloadavg()[0] > cores


def choose_threads(requested: str) -> int | None:
    """`--threads`: a number, or "auto" (1 on a busy machine, else torch's own choice, None)."""
    if requested == "auto":
        return 1 if busy_machine() else None
    return int(requested) or None


def steady_s_per_step(stamps: dict[int, float], warmup: int) -> float | None:
    """Seconds per step from `warmup`'s report to the last one; None when too few steps were reported."""
    steps = sorted(s for s in stamps if s >= warmup)
    if len(steps) < 2 or warmup not in stamps:
        return None
    first, last = steps[0], steps[-1]
    return (stamps[last] - stamps[first]) / (last - first)


def rss_while_stepping(watcher: "RssWatcher", stamps: dict[int, float], warmup: int) -> int | None:
    """The highest RSS polled during the timed steps (after the warm-up): the training's own working set, without
    the transient of loading the model."""
    if warmup not in stamps or not stamps:
        return None
    return watcher.highest_between(stamps[warmup], stamps[max(stamps)])


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of `process` so far (its threads, not its children). On a busy machine this grows
    with the work done, where wall time also counts the waiting for a core."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return float("nan")
    return times.user + times.system


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def wait_with_peak_rss(process: subprocess.Popen) -> tuple[int, int]:
    """Wait for a child and return (exit code, its own peak RSS in bytes). `wait4` reports the child's own
    high-water mark, which is exact where polling could miss a short peak (Linux: ru_maxrss is in KiB)."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss * 1024


def child_import_rss(python: str, code: str, cwd: Path, env: dict[str, str]) -> int:
    """Peak RSS of a fresh interpreter that only runs `code` (e.g. the trainer's imports): the floor that a
    process doing nothing else already costs."""
    process = subprocess.Popen([python, "-c", code], cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    code_, peak = wait_with_peak_rss(process)
    if code_ != 0:
        raise RuntimeError(f"{python} -c {code!r} failed with status {code_}")
    return peak


class RssWatcher:
    """RSS of a running process (a ComfyUI server, a trainer child), polled from `start()` to `stop()`: the peak,
    the RSS at `start()`, and the highest value seen in a time window. With `reset_peak` it also resets the kernel's
    high-water mark where Linux allows it (clear_refs 5), so a peak shorter than the polling interval still counts."""

    def __init__(self, pid: int, *, reset_peak: bool = False, poll_s: float = 0.05):
        self.pid = pid
        self.poll_s = poll_s
        self.process = psutil.Process(pid)
        self.reset_peak = reset_peak
        self.baseline = 0
        self.samples: list[tuple[float, int]] = []
        """(perf_counter, RSS bytes)."""
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "RssWatcher":
        if self.reset_peak:
            try:
                Path(f"/proc/{self.pid}/clear_refs").write_text("5")
                self._hwm_reset = True
            except OSError:
                self._hwm_reset = False
        self.baseline = self.process.memory_info().rss
        self.samples.append((time.perf_counter(), self.baseline))
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """The peak RSS in bytes since `start()`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = max(rss for _, rss in self.samples)
        if self._hwm_reset:
            try:
                peak = max(peak, _proc_status_kib(self.pid, "VmHWM") * 1024)
            except OSError:
                pass
        return peak

    def highest_between(self, start: float, end: float) -> int | None:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside) if inside else None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            except psutil.Error:
                return


def _proc_status_kib(pid: int, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0
