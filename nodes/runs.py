"""Run records: one `run.json` per training run, beside the trainer's own files in its run folder.

`<RUNS_ROOT>/<run_id>/` is the trainer's run folder (config.json, events.jsonl, checkpoints/, samples/, train.log);
the nodes add `run.json` (what the dashboard lists) and `request.json` (the config the trainer was started with).
Records survive a restart: a record still marked running whose process is gone is settled from its event log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..trainers.io import atomic_write_text, file_fingerprint, same_file
from ..trainers.runfolder import (DONE_MODEL, DONE_SAMPLE_PREFIX, OUTCOME_EVENTS, DoneEvent, ProgressEvent, RunFolder,
                                  family_from_metadata, output_kind, safetensors_metadata, succeeded)

log = logging.getLogger("comfyui-finetune")

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
RECORD_FILE, REQUEST_FILE = "run.json", "request.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
EVENTS_READ_LIMIT = 4 * 2**20
"""Bytes of the event log one request of the dashboard reads at most; it asks again from where this one ended."""
_LIVE_RUN_IDS: set[str] = set()
"""Runs this process is driving right now; any other run marked running is checked for a live trainer process."""


def RUNS_ROOT() -> Path:  # noqa: N802 (the dashboard's API names it so)
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "finetune"


@dataclass
class RunRecord:
    id: str
    name: str
    status: str = "queued"
    method: str = "lora"
    """The trainer's method, with " + DreamBooth" when prior preservation training is on."""
    base_model: str = ""
    """The base checkpoint's name in models/checkpoints."""
    dataset_size: int = 0
    steps: int = 0
    step: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    """"lora", "checkpoint", "embedding" or "controlnet": the file's name in its models folder, "path": its full path,
    "file": its size and hash when written, "samples": sample images relative to the run folder."""
    trigger_word: str = ""
    class_noun: str = ""
    content_hash: str = ""
    prompt_id: str = ""
    node_id: str = ""
    loss: float | None = None
    pid: int = 0
    """The trainer process while it runs."""

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    @property
    def output_kind(self) -> str:
        """"lora", "checkpoint", "embedding" or "controlnet", from the method (less any " + DreamBooth")."""
        return output_kind(self.method)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (with `duration`)."""
        return {**dataclasses.asdict(self), "duration": self.duration}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        if record.status not in STATUSES:
            raise ValueError(f"unknown status {record.status!r}")
        return record


def still_ours(record: RunRecord) -> bool:
    """Whether the run's result file is still the one it wrote (not deleted, not replaced by another file of that
    name). A record from before sizes and hashes were kept cannot tell, and answers False."""
    path, written = record.outputs.get("path", ""), record.outputs.get("file")
    return bool(path) and isinstance(written, dict) and same_file(Path(path), written)


class RunStore:
    def __init__(self, root: Path | None = None, *, read_only: bool = False):
        self.root = Path(root) if root is not None else RUNS_ROOT()
        self.read_only = read_only
        """Settle a dead run's record in memory only (the dashboard's GETs never write)."""

    def run_dir(self, run_id: str) -> Path:
        if not _RUN_ID.match(run_id) or ".." in run_id:
            raise ValueError(f"not a run id: {run_id!r}")
        return self.root / run_id

    def list(self) -> list[RunRecord]:
        """Every readable record, newest first."""
        if not self.root.is_dir():
            return []
        records = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not (folder / RECORD_FILE).is_file():
                continue
            record = self._read(folder)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: r.created, reverse=True)

    def get(self, run_id: str) -> RunRecord | None:
        try:
            folder = self.run_dir(run_id)
        except ValueError:
            return None
        return self._read(folder) if (folder / RECORD_FILE).is_file() else None

    def save(self, record: RunRecord) -> None:
        atomic_write_text(self.run_dir(record.id) / RECORD_FILE, json.dumps(record.to_json(), indent=2) + "\n")

    def events(self, run_id: str, since: int = 0) -> list[dict[str, Any]]:
        """The events logged from line `since` on. A last line still being written is left for the next call."""
        try:
            path = RunFolder(self.run_dir(run_id)).events
            text = path.read_text(encoding="utf-8", errors="replace")
        except (ValueError, OSError):
            return []
        lines = text.split("\n")[:-1]  # the piece after the last newline is incomplete (or empty)
        events = []
        for number, line in enumerate(lines[max(0, since):], start=max(0, since)):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"event": "unreadable", "line": number})
        return events

    def events_after(self, run_id: str, offset: int, limit: int = EVENTS_READ_LIMIT) -> tuple[list[dict[str, Any]], int]:
        """The events logged from byte `offset` of the log on (at most about `limit` bytes of them), and the offset
        to ask from next time: only the new part of the file is read. A last line still being written is left for
        the next call."""
        try:
            with open(RunFolder(self.run_dir(run_id)).events, "rb") as f:
                f.seek(offset)
                chunk = f.read(limit)
        except (ValueError, OSError):
            return [], offset
        complete = chunk[:chunk.rfind(b"\n") + 1]
        events = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"event": "unreadable"})
        return events, offset + len(complete)

    def request_stop(self, run_id: str) -> bool:
        """Ask a running run to save a checkpoint and stop; False when it is not running."""
        record = self.get(run_id)
        if record is None or record.status not in ACTIVE_STATUSES:
            return False
        atomic_write_text(RunFolder(self.run_dir(run_id)).stop, "stop requested\n")
        return True

    def made_loras(self) -> list[dict[str, Any]]:
        """The LoRA files our runs wrote that are still in models/loras, newest first."""
        found = []
        for record in self.list():
            path = Path(record.outputs.get("path", ""))
            if record.status != "succeeded" or "lora" not in record.outputs or not path.is_file():
                continue
            found.append({"name": record.outputs["lora"], "path": str(path), "trigger_word": record.trigger_word,
                          "run_id": record.id, "metadata": lora_summary(path)})
        return found

    # ---- internals ---------------------------------------------------------------------------------------
    def _read(self, folder: Path) -> RunRecord | None:
        try:
            record = RunRecord.from_json(json.loads((folder / RECORD_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("comfyui-finetune: skipping the unreadable run record %s (%s)", folder / RECORD_FILE, exc)
            return None
        if record.status in ACTIVE_STATUSES and not is_live(record):
            settle_from_events(record, self.events(record.id), folder)
            if not self.read_only:
                self.save(record)
        return record


@contextmanager
def live(run_id: str) -> Iterator[None]:
    """Mark a run as driven by this process for the duration of the block."""
    _LIVE_RUN_IDS.add(run_id)
    try:
        yield
    finally:
        _LIVE_RUN_IDS.discard(run_id)


def is_live(record: RunRecord) -> bool:
    return record.id in _LIVE_RUN_IDS or _trainer_process_alive(record.pid)


def settle_from_events(record: RunRecord, events: list[dict[str, Any]], run_dir: Path) -> None:
    """Give a run whose trainer is gone its final status: from its last `done`/`error` event, else from whether a
    checkpoint is there to resume from."""
    record.pid = 0
    record.finished = record.finished or time.time()
    outcome = next((e for e in reversed(events) if e.get("event") in OUTCOME_EVENTS), None)
    if outcome is not None and succeeded(outcome):
        record.status, record.error = "succeeded", ""
        record.outputs = outputs_from_done(outcome, run_dir, record.output_kind)
    elif outcome is not None and outcome["event"] == DoneEvent.EVENT:
        record.status, record.error = "cancelled", ""
    elif outcome is not None:
        record.status, record.error = "failed", str(outcome.get("message", "the trainer reported an error"))
    elif RunFolder(run_dir).has_checkpoint():
        record.status = "cancelled"
        record.error = "ComfyUI stopped while this run was training; queue it again to resume from its checkpoint"
    else:
        record.status = "failed"
        record.error = "ComfyUI stopped before this run saved a checkpoint; queue it again to start over"
    progress = [e for e in events if e.get("event") == ProgressEvent.EVENT]
    if progress:
        record.step, record.loss = int(progress[-1]["step"]), progress[-1].get("loss")


def outputs_from_done(done: dict[str, Any], run_dir: Path, kind: str) -> dict[str, Any]:
    """A record's `outputs` from the trainer's `done` event; the result lies directly in its models folder. `file`
    (size and hash) tells later whether the file there still is the one the run wrote."""
    produced = done.get("outputs", {})
    model = Path(produced[DONE_MODEL])
    samples = [Path(p) for key, p in sorted(produced.items()) if key.startswith(DONE_SAMPLE_PREFIX)]
    try:
        written = file_fingerprint(model)
    except OSError:
        written = {}
    return {kind: model.name, "path": str(model), "file": written,
            "samples": [p.relative_to(run_dir).as_posix() if p.is_relative_to(run_dir) else str(p) for p in samples]}


def lora_family(path: Path) -> str:
    """"sd1", "sd2" or "sdxl" from a LoRA file's header; "" when it does not say."""
    return family_from_metadata(safetensors_metadata(path)) or ""


def lora_summary(path: Path) -> dict[str, Any]:
    """What the dashboard shows about a LoRA file, from its header."""
    meta = safetensors_metadata(path)
    return {"family": family_from_metadata(meta) or "", "base_model": meta.get("ss_sd_model_name", ""),
            "rank": meta.get("ss_network_dim", ""), "alpha": meta.get("ss_network_alpha", ""),
            "steps": meta.get("ss_steps", ""), "resolution": meta.get("modelspec.resolution", ""),
            "images": meta.get("ss_num_train_images", ""), "trained_at": meta.get("modelspec.date", ""),
            "size_mb": round(path.stat().st_size / 2**20, 2)}


def _trainer_process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        import psutil

        return any("trainers" in part for part in psutil.Process(pid).cmdline())
    except Exception:  # no such process, no permission, or no psutil: not a trainer we can account for
        return False
