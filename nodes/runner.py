"""The bridge from a Train node to the trainer: `python -m trainers train <run>/request.json --events` in a child
process, shown in ComfyUI as a progress bar (the newest sample as its preview), progress text and page events, and
stopped cleanly by Cancel.

A run's folder is named from a content hash of its images, settings and base model file: a finished run with the
same hash is returned without training, a cancelled or failed one with a checkpoint resumes (`--resume`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..trainers.config import Config
from ..trainers.errors import FinetuneError
from ..trainers.errors import DiskFullError
from ..trainers.io import atomic_path, atomic_write_text, is_disk_full, unique_path
from ..trainers.runfolder import (MODEL_FOLDERS, CheckpointEvent, DoneEvent, ErrorEvent, PlanEvent, ProgressEvent,
                                  RunFolder, SampleEvent, StatusEvent, succeeded)
from .runs import ACTIVE_STATUSES, REQUEST_FILE, RunRecord, RunStore, live, outputs_from_done, still_ours
from .saved_prompts import remember_prompt
from .types import NodeError, TrainingImages, mask_to_pil, node_error, pixels_to_pil

PACK_DIR = Path(__file__).resolve().parents[1]
MANIFEST_FILE, LOG_FILE = "manifest.jsonl", "train.log"
POLL_S = 0.2
RECORD_SAVE_EVERY_S = 1.0
log = logging.getLogger("comfyui-finetune")
STOP_WAIT_S = float(os.environ.get("COMFYUI_FINETUNE_STOP_WAIT_S", "30"))
"""How long a cancelled run may take to save its checkpoint before its process is killed."""
IDLE_TIMEOUT_S = float(os.environ.get("COMFYUI_FINETUNE_IDLE_TIMEOUT_S", "1800"))
"""A trainer that prints nothing for this long is taken for hung and stopped."""


def checked_config(settings: dict[str, Any], base_path: Path, name: str) -> Config:
    """A node's settings as the validated trainer config, with placeholders where the runner puts the run's paths;
    raises the trainer's FinetuneError naming the field."""
    data = json.loads(json.dumps(settings))
    data.setdefault("model", {})["base"] = str(base_path)
    data.setdefault("data", {})["manifest"] = "-"
    data.setdefault("output", {}).update(dir="-", name=name, export_path="")
    cfg = Config.from_dict(data)
    cfg.validate()
    return cfg


@dataclass
class TrainingJob:
    """What a Train node asks for: everything the result depends on, and nothing about where files go."""

    name: str
    kind: str
    """What is written, and so into which models folder (`runfolder.MODEL_FOLDERS`)."""
    base_name: str
    base_path: Path
    dataset: TrainingImages
    settings: dict[str, Any]
    """Config sections as set on the node (what the run's content hash covers)."""
    cfg: Config
    """`settings` as the checked config (`checked_config`); the runner only adds the run's paths to it."""
    node_id: str = ""
    prompt_id: str = ""
    input_names: dict[str, str] = field(default_factory=dict)
    """Config fields and the node inputs that set them ({"lora.rank": "rank"}): the trainer's errors name the input."""

    @property
    def method(self) -> str:
        method = self.settings["train"]["method"]
        return f"{method} + DreamBooth" if self.settings.get("dreambooth", {}).get("enabled") else method

    def placed(self, *, manifest: Path, run_dir: Path, export_path: Path) -> Config:
        """The checked config with the run's paths: the images' manifest, the run folder, the result's file."""
        cfg = self.cfg
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=str(manifest)),
                                   output=dataclasses.replace(cfg.output, dir=str(run_dir.parent), name=run_dir.name,
                                                              export_path=str(export_path)))

    def content_hash(self) -> str:
        stat = self.base_path.stat()
        identity = {"base": [self.base_name, stat.st_size, stat.st_mtime_ns], "kind": self.kind, "name": self.name,
                    "data": self.dataset.fingerprint(), "settings": self.settings}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def run_training(job: TrainingJob, store: RunStore | None = None) -> RunRecord:
    """Train (or resume, or reuse) the run for `job`; returns its succeeded record. Cancel raises ComfyUI's
    interrupt; a failure raises NodeError with the trainer's own message; a full disk says so, naming the folder."""
    store = store or RunStore()
    try:
        return _run_training(job, store)
    except FinetuneError as exc:  # from our own writes here (e.g. a DiskFullError)
        raise NodeError(str(exc)) from None
    except OSError as exc:
        if is_disk_full(exc):
            raise NodeError(str(DiskFullError(Path(exc.filename or store.root).parent))) from None
        raise


def _run_training(job: TrainingJob, store: RunStore) -> RunRecord:
    content_hash = job.content_hash()
    run_id = f"{_slug(job.name)}_{content_hash[:10]}"
    found = store.get(run_id)
    if found is not None and found.status == "succeeded" and still_ours(found):
        return found
    if found is not None and found.status in ACTIVE_STATUSES:
        raise NodeError(f"this exact training is already running (run {run_id}) — wait for it to finish, or stop "
                        "it in the Fine-tunes panel")
    run_dir = store.run_dir(run_id)
    resume = found is not None and RunFolder(run_dir).has_checkpoint()
    cfg = job.placed(manifest=run_dir / MANIFEST_FILE, run_dir=run_dir, export_path=_export_path(job, run_dir))
    if not resume and RunFolder(run_dir).config.exists():
        cfg.output.overwrite = True  # an earlier attempt failed before its first checkpoint: start it over
    write_manifest(job.dataset, run_dir)
    cfg.save(run_dir / REQUEST_FILE)
    record = RunRecord(id=run_id, name=job.name, method=job.method, base_model=job.base_name,
                       dataset_size=len(job.dataset.entries), steps=cfg.train.steps,
                       created=found.created if found else time.time(), trigger_word=cfg.data.trigger_word,
                       class_noun=cfg.data.class_noun, content_hash=content_hash, prompt_id=job.prompt_id,
                       node_id=job.node_id, step=found.step if (found and resume) else 0)
    RunFolder(run_dir).stop.unlink(missing_ok=True)  # an earlier run's; from here on a STOP is a Cancel of this one
    store.save(record)
    remember_prompt(store, record)
    with live(run_id):
        return TrainerProcess(store, record, run_dir, job.kind, resume, job.input_names).run()


def write_manifest(dataset: TrainingImages, run_dir: Path) -> Path:
    """One JSON line per image; images that exist only in memory are saved beside it as PNG first."""
    lines = []
    for n, entry in enumerate(dataset.entries):
        if entry.path is not None:
            image = entry.path
        else:
            target = run_dir / "images" / f"{n:05d}.png"
            with atomic_path(target) as tmp:
                pixels_to_pil(entry.pixels).save(tmp, format="PNG")
            if entry.mask is not None:  # the trainer finds it beside its image (data.masked_loss)
                with atomic_path(target.with_name(f"{n:05d}.mask.png")) as tmp:
                    mask_to_pil(entry.mask).save(tmp, format="PNG")
            image = str(target)
        line = {"image": image, "repeats": entry.repeats}
        if entry.caption:
            line["caption"] = entry.caption
        lines.append(json.dumps(line, ensure_ascii=False))
    manifest = run_dir / MANIFEST_FILE
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


class TrainerProcess:
    """One attempt of a run: the child process, its events, and what ComfyUI and the record learn from them."""

    def __init__(self, store: RunStore, record: RunRecord, run_dir: Path, kind: str, resume: bool,
                 input_names: dict[str, str] | None = None):
        self.store, self.record, self.run_dir, self.kind, self.resume = store, record, run_dir, kind, resume
        self.input_names = input_names or {}
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.process: subprocess.Popen | None = None
        self.progress_bar = None
        self.preview = None
        self.outcome: dict[str, Any] | None = None
        self.last_saved = 0.0
        self.seconds_per_step = 0.0

    def run(self) -> RunRecord:
        import comfy.model_management as mm

        mm.unload_all_models()  # the trainer needs the memory ComfyUI's loaded models hold
        mm.soft_empty_cache()
        self._start()
        try:
            self._follow()
        except BaseException as exc:
            self._stop_process(graceful=False)
            if self.record.status == "running":  # not ended by Cancel or a reported failure: a fault here
                self._end("failed", f"{type(exc).__name__}: {exc}")
            raise
        return self._finish()

    # ---- the child process ---------------------------------------------------------------------------------
    def _start(self) -> None:
        command = [sys.executable, "-m", "trainers", "train", str(self.run_dir / REQUEST_FILE), "--events"]
        if self.resume:
            command.append("--resume")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        env["PYTHONPATH"] = os.pathsep.join([str(PACK_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(command, cwd=PACK_DIR, env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=log, text=True, encoding="utf-8",
                                            errors="replace", bufsize=1)
        threading.Thread(target=self._read_stdout, name=f"finetune-{self.record.id}", daemon=True).start()
        self.record.status, self.record.started, self.record.pid = "running", time.time(), self.process.pid
        self.record.finished, self.record.error = None, ""
        self._save_record(force=True)
        self._send("finetune.status", {"event": "run", "resumed": self.resume})

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _follow(self) -> None:
        """Handle events until the trainer's output ends; Cancel and a silent trainer end it early."""
        import comfy.model_management as mm

        last_output = time.monotonic()
        while True:
            if mm.processing_interrupted():
                self._cancel()
            try:
                line = self.lines.get(timeout=POLL_S)
            except queue.Empty:
                if time.monotonic() - last_output > IDLE_TIMEOUT_S:
                    self._stop_process(graceful=False)
                    self._fail(f"the trainer printed nothing for {IDLE_TIMEOUT_S:.0f} s and was stopped (set "
                               "COMFYUI_FINETUNE_IDLE_TIMEOUT_S to wait longer)")
                continue
            if line is None:
                return
            last_output = time.monotonic()
            event = _parse_event(line)
            if event is not None:
                try:
                    self._on_event(event, show_progress=True)
                except mm.InterruptProcessingException:  # Cancel arrived inside ComfyUI's progress hook
                    self._cancel()

    def _stop_process(self, *, graceful: bool) -> None:
        """Ask the trainer to checkpoint and exit (STOP file), then kill it if it has not within STOP_WAIT_S plus
        two steps' time (the trainer stops after the step under way)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        if graceful:
            atomic_write_text(RunFolder(self.run_dir).stop, "stop requested from ComfyUI\n")
            deadline = time.monotonic() + STOP_WAIT_S + 2 * self.seconds_per_step
            while process.poll() is None and time.monotonic() < deadline:
                self._drain(timeout=POLL_S)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        self._drain(timeout=0)

    def _drain(self, timeout: float) -> None:
        """Record events that arrive while stopping (the checkpoint), without touching ComfyUI's progress bar."""
        try:
            line = self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait()
            while line is not None:
                event = _parse_event(line)
                if event is not None:
                    self._on_event(event, show_progress=False)
                line = self.lines.get_nowait()
        except queue.Empty:
            pass

    # ---- events ---------------------------------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any], *, show_progress: bool) -> None:
        kind = event.get("event")
        if kind == ProgressEvent.EVENT:
            self.record.step, self.record.loss = int(event["step"]), event.get("loss")
            if event.get("it_s"):
                self.seconds_per_step = 1.0 / float(event["it_s"])
            self.record.steps = int(event.get("total") or self.record.steps)
            self._save_record()
            if show_progress:
                self._show_progress(event)
            self._send("finetune.progress", event)
            return
        if kind == PlanEvent.EVENT:
            self.record.steps, self.record.dataset_size = int(event.get("steps", 0)), int(event.get("images", 0))
            memory = event.get("memory_plan") or {}
            if show_progress and memory.get("text"):
                self._progress_text(memory["text"])
        elif kind == SampleEvent.EVENT:
            self._on_sample(event, show_progress)
            return
        elif kind in (DoneEvent.EVENT, ErrorEvent.EVENT):
            self.outcome = event
        elif kind == StatusEvent.EVENT and show_progress:
            self._progress_text(str(event.get("message", "")))
        self._save_record(force=kind in (PlanEvent.EVENT, CheckpointEvent.EVENT, DoneEvent.EVENT, ErrorEvent.EVENT))
        self._send("finetune.status", event)

    def _on_sample(self, event: dict[str, Any], show_progress: bool) -> None:
        import folder_paths
        from PIL import Image

        output_dir = Path(folder_paths.get_output_directory())
        paths = [Path(p) for p in event.get("paths", [])]
        images = [{"filename": p.name, "subfolder": p.parent.relative_to(output_dir).as_posix(), "type": "output"}
                  for p in paths if p.is_relative_to(output_dir)]
        if paths and show_progress:
            with Image.open(paths[-1]) as newest:
                self.preview = ("JPEG", newest.convert("RGB"), 512)
            self._update_bar(self.record.step)
        self._send("finetune.sample", {**event, "images": images})

    def _show_progress(self, event: dict[str, Any]) -> None:
        self._update_bar(int(event["step"]), int(event.get("total") or self.record.steps))
        parts = [f"step {event['step']}/{event.get('total')}", f"loss {event.get('loss', 0):.4f}",
                 f"avg {event.get('loss_avg', 0):.4f}"]
        if event.get("it_s"):
            parts.append(f"{event['it_s']:.2f} it/s")
        if event.get("eta_s") is not None:
            parts.append(f"ETA {_duration(event['eta_s'])}")
        self._progress_text(" · ".join(parts))

    def _update_bar(self, step: int, total: int | None = None) -> None:
        import comfy.utils

        total = total or max(self.record.steps, 1)
        if self.progress_bar is None:
            self.progress_bar = comfy.utils.ProgressBar(total)
        preview, self.preview = self.preview, None
        self.progress_bar.update_absolute(step, total, preview)

    def _progress_text(self, text: str) -> None:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, self.record.node_id)

    def _send(self, kind: str, event: dict[str, Any]) -> None:
        from server import PromptServer

        PromptServer.instance.send_sync(kind, {**event, "run_id": self.record.id, "node_id": self.record.node_id,
                                               "prompt_id": self.record.prompt_id, "run_status": self.record.status})

    # ---- endings --------------------------------------------------------------------------------------------
    def _cancel(self) -> None:
        import comfy.model_management as mm

        self._stop_process(graceful=True)
        self._end("cancelled", f"cancelled at step {self.record.step}" + (
            "; queue the workflow again to resume" if RunFolder(self.run_dir).has_checkpoint() else ""))
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()

    def _finish(self) -> RunRecord:
        import comfy.model_management as mm

        assert self.process is not None
        code = self.process.wait()
        outcome = self.outcome or {}
        if succeeded(outcome):
            self.record.outputs = outputs_from_done(outcome, self.run_dir, self.kind)
            self._end("succeeded", "")
            return self.record
        if outcome.get("event") == DoneEvent.EVENT:  # stopped from the Fine-tunes panel (its STOP file)
            self._end("cancelled", f"stopped at step {self.record.step}; queue the workflow again to resume")
            raise mm.InterruptProcessingException()
        if outcome.get("event") == ErrorEvent.EVENT:
            self._fail(in_node_terms(outcome, self.input_names), crashed=code == 1)
        self._fail(_exit_reason(code, self.run_dir / LOG_FILE))

    def _fail(self, message: str, *, crashed: bool = True) -> NoReturn:
        if "out of memory" in message.lower():
            message += " — lower `batch_size` or `resolution`, or set gradient_checkpointing = true under [train] " \
                       "in `advanced`"
        self._end("failed", message)
        log_hint = f" (full log: {self.run_dir / LOG_FILE})" if crashed else ""
        raise NodeError(f"Training failed: {message}{log_hint}")

    def _end(self, status: str, error: str) -> None:
        self.record.status, self.record.error, self.record.finished, self.record.pid = status, error, time.time(), 0
        self._save_record(force=True)
        self._send("finetune.status", {"event": "run", "error": error, "outputs": self.record.outputs})

    def _save_record(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_saved >= RECORD_SAVE_EVERY_S:
            try:
                self.store.save(self.record)
            except FinetuneError as exc:  # a full disk: the dashboard settles the record from the trainer's pid
                log.warning("comfyui-finetune: cannot save the run record of %s (%s)", self.record.id, exc)
            self.last_saved = now


def in_node_terms(error: dict[str, Any], input_names: dict[str, str]) -> str:
    """The trainer's `error` event ("where: problem — fix") with the config fields it names put as the node's
    inputs, as a bad value caught before the trainer started is put."""
    message, where = str(error.get("message", "")), str(error.get("where") or "")
    if not input_names:
        return message
    if where and message.startswith(f"{where}: "):
        message = message[len(where) + 2:]
    else:
        where = ""
    field_name, is_setting, value = where.partition(" = ")  # e.g. "ddpo.reward_model = /models/clip"
    if is_setting and field_name in input_names:
        where = f"`{input_names[field_name]}` ({value})"
    problem, _, fix = message.partition(" — ")
    return str(node_error(FinetuneError(problem, fix, where=where), input_names))


def _export_path(job: TrainingJob, run_dir: Path) -> Path:
    """The result's place in its models folder: the earlier attempt's if still free, else a new unique name."""
    import folder_paths

    request = run_dir / REQUEST_FILE
    if request.is_file():
        earlier = json.loads(request.read_text(encoding="utf-8")).get("output", {}).get("export_path", "")
        if earlier and not Path(earlier).exists():
            return Path(earlier)
    folder = Path(folder_paths.get_folder_paths(MODEL_FOLDERS[job.kind])[0])
    return unique_path(folder, job.name, ".safetensors")


def _parse_event(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _exit_reason(code: int, log_path: Path) -> str:
    if code < 0:
        return (f"the training process was killed by signal {-code} (often: the computer ran out of memory) "
                "— lower `batch_size` or `resolution`")
    tail = [line for line in _tail(log_path, 40) if line.strip()]
    errors = [line for line in tail if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    last = errors[-1] if errors else (tail[-1] if tail else "")
    return f"the training process exited with status {code}: {last.strip() or 'no message'}"


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            return f.read().decode("utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:80] or "run"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
