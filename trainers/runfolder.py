"""The contract between the trainer and whoever watches it (the CLI, the ComfyUI nodes, the dashboard): the run
folder's layout, the events the trainer writes, what each method outputs, and how a result file is read back.

The trainer writes a run folder and the nodes read it; both take every name from here, so neither side spells a
file name or an event field of its own.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# ---- the run folder ---------------------------------------------------------------------------------------------
CONFIG_FILE = "config.json"
"""The resolved config the run trains with."""
EVENTS_FILE = "events.jsonl"
"""Every event, one JSON object per line."""
STOP_FILE = "STOP"
"""Its presence asks the running trainer to save a checkpoint and stop."""
CHECKPOINTS_DIR, SAMPLES_DIR = "checkpoints", "samples"
TENSORBOARD_DIR, INTERMEDIATE_DIR = "tensorboard", "intermediate"
STEP_PREFIX = "step_"
CHECKPOINT_STATE_FILE = "state.json"
"""Written last into a checkpoint folder: a folder with it is complete and can be resumed from."""
SET_ASIDE_SUFFIX = ".old"
"""A checkpoint being replaced is renamed to `.step_NNNNNN.old` until its replacement is in place."""


@dataclass(frozen=True)
class RunFolder:
    """`<output.dir>/<output.name>/`: `config.json`, `events.jsonl`, `checkpoints/step_000123/`,
    `samples/step_000100_0.png`, `tensorboard/`, `intermediate/`, and (by default) the exported result."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def events(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def stop(self) -> Path:
        return self.path / STOP_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def intermediate(self) -> Path:
        return self.path / INTERMEDIATE_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{STEP_PREFIX}{step:06d}"

    def sample(self, step: int, n: int) -> Path:
        return self.samples / f"{STEP_PREFIX}{step:06d}_{n}.png"

    def samples_at(self, step: int) -> list[Path]:
        return sorted(self.samples.glob(f"{STEP_PREFIX}{step:06d}_*.png"))

    def step_folders(self) -> list[Path]:
        """Every checkpoint folder, complete or not, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, the one `--resume` continues from."""
        done = [p for p in self.step_folders() if (p / CHECKPOINT_STATE_FILE).is_file()]
        return done[-1] if done else None

    def set_aside_checkpoints(self) -> list[Path]:
        """Complete checkpoints set aside for a replacement that never arrived (a crash in between); `--resume` puts
        them back (checkpointing.latest_checkpoint). Read only, so the nodes can ask on a GET."""
        if not self.checkpoints.is_dir():
            return []
        return [old for old in sorted(self.checkpoints.glob(f".{STEP_PREFIX}*{SET_ASIDE_SUFFIX}"))
                if (old / CHECKPOINT_STATE_FILE).is_file()
                and not old.with_name(old.name[1:-len(SET_ASIDE_SUFFIX)]).exists()]

    def has_checkpoint(self) -> bool:
        """Whether `--resume` has a checkpoint to continue from."""
        return self.latest_checkpoint() is not None or bool(self.set_aside_checkpoints())


# ---- what each method writes -------------------------------------------------------------------------------------
OUTPUT_KINDS = {"lora": "lora", "full": "checkpoint", "textual_inversion": "embedding", "controlnet": "controlnet",
                "ddpo": "lora"}
"""Each trainer method's kind of result (a run record's `outputs` key)."""
MODEL_FOLDERS = {"lora": "loras", "checkpoint": "checkpoints", "embedding": "embeddings", "controlnet": "controlnet"}
"""Each kind of result's models folder in ComfyUI."""


def output_kind(method: str) -> str:
    """The kind of result of a method ("lora", or "lora + DreamBooth" as a run record names it)."""
    return OUTPUT_KINDS.get(method.split(" + ")[0].strip(), "lora")


# ---- result files -----------------------------------------------------------------------------------------------
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, read without loading any tensor; OSError or ValueError when unreadable."""
    with open(path, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
        except struct.error:
            raise ValueError("shorter than a safetensors header") from None
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"a header of {length} bytes is not a safetensors header")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file; {} when unreadable."""
    try:
        metadata = read_safetensors_header(path).get("__metadata__")
    except (OSError, ValueError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


_ARCHITECTURE_FAMILIES = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"),
                          ("stable-diffusion-v1", "sd1"))
_BASE_VERSION_FAMILIES = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """"sd1", "sd2" or "sdxl" from a model file's modelspec or kohya (ss_*) metadata; None when it says neither."""
    architecture = metadata.get("modelspec.architecture", "")
    for start, family in _ARCHITECTURE_FAMILIES:
        if architecture.startswith(start):
            return family
    version = metadata.get("ss_base_model_version", "")
    for start, family in _BASE_VERSION_FAMILIES:
        if version.startswith(start):
            return family
    return None


# ---- events -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One event: `{"event": EVENT, "time": ..., **fields}` on a line of events.jsonl (and of stdout with
    `--events`). Fields that are None are left out; a `values` dict is spread into the event."""

    EVENT: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        spread = data.pop("values", None) or {}
        return {**{k: v for k, v in data.items() if v is not None}, **spread}

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.EVENT, **self.fields()}


@dataclass(frozen=True)
class PlanEvent(Event):
    """What will be trained (`Plan.summary()`: method, images, steps, buckets, memory estimate, text...)."""

    EVENT = "plan"
    values: dict[str, Any]


@dataclass(frozen=True)
class StatusEvent(Event):
    EVENT = "status"
    message: str
    step: int


@dataclass(frozen=True)
class ProgressEvent(Event):
    """After every optimizer step. `lrs`: each optimizer group's learning rate; `values`: the method's own numbers
    (e.g. DDPO's `reward_mean`, DreamBooth's `loss_prior`)."""

    EVENT = "progress"
    step: int
    total: int
    loss: float
    loss_avg: float
    lr: float
    lrs: list[float]
    it_s: float
    eta_s: float | None
    values: dict[str, float] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "eta_s": self.eta_s}  # an unknown ETA is written as null


@dataclass(frozen=True)
class SampleEvent(Event):
    EVENT = "sample"
    step: int
    paths: list[str]


@dataclass(frozen=True)
class ValidationEvent(Event):
    EVENT = "validation"
    step: int
    loss: float


@dataclass(frozen=True)
class CheckpointEvent(Event):
    EVENT = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class SavedEvent(Event):
    """A result file written: `kind` is the method's name, with "-intermediate" for a `save_every` file."""

    EVENT = "saved"
    step: int
    path: str
    kind: str


SUCCEEDED, STOPPED = "succeeded", "stopped"
DONE_MODEL, DONE_CONFIG, DONE_SAMPLE_PREFIX = "model", "config", "sample_"
"""The keys of a `done` event's outputs: the result file, the resolved config, each last sample image (sample_0...)."""


@dataclass(frozen=True)
class DoneEvent(Event):
    """The end of a run: `status` SUCCEEDED with its `outputs` (DONE_MODEL, DONE_CONFIG, DONE_SAMPLE_PREFIX<n>:
    paths), or STOPPED with the `checkpoint` to resume from."""

    EVENT = "done"
    status: str
    step: int
    outputs: dict[str, str] | None = None
    checkpoint: str | None = None
    processes: int | None = None
    replicas_in_sync: bool | None = None


@dataclass(frozen=True)
class ErrorEvent(Event):
    """A failure; `where` names the config field or file when the user can fix it."""

    EVENT = "error"
    message: str
    where: str | None = None


OUTCOME_EVENTS = (DoneEvent.EVENT, ErrorEvent.EVENT)


def event_kind(event: dict[str, Any]) -> str:
    return str(event.get("event", ""))


def succeeded(event: dict[str, Any]) -> bool:
    """Whether a (read-back) event is the `done` of a finished run."""
    return event_kind(event) == DoneEvent.EVENT and event.get("status") == SUCCEEDED
