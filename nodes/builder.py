"""What every Train node shares: its inputs, its spec (which method, what it writes), the one `build_job` that turns
its inputs into a checked trainer job, and its result images (the loss or reward chart and the last samples)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..trainers import toml_reader
from ..trainers.config import fill_template
from ..trainers.errors import FinetuneError
from ..trainers.io import atomic_path
from ..trainers.runfolder import ProgressEvent
from .access import confine_settings
from .charts import LossHistory, loss_chart
from .choices import DEFAULT_OPTIMIZER, learning_rate_input, optimizer_input
from .runner import TrainingJob, checked_config
from .runs import RunRecord, RunStore, still_ours
from .types import NodeError, TrainingImages, image_batch, node_error
from .validation import check_inputs

TRAINER_NEEDS = ("diffusers", "peft", "transformers", "accelerate", "safetensors")
# The trainer runs in its own process: here it is enough to know its packages are installed, without the seconds
# that importing them would add to ComfyUI's start.
for _package in TRAINER_NEEDS:
    if importlib.util.find_spec(_package) is None:
        raise ModuleNotFoundError(f"No module named '{_package}'", name=_package)

SHARED_INPUT_NAMES = {"model.base": "base_checkpoint", "train.steps": "steps", "train.optimizer": "optimizer",
                      "train.learning_rate": "learning_rate", "train.batch_size": "batch_size", "train.seed": "seed",
                      "data.resolution": "resolution", "output.name": "name", "output.sample_every": "sample_every"}
"""Config fields every Train node sets from an input of the same meaning: the trainer's errors name the input."""
SET_BY_NODE = {"model": ("base",), "data": ("folder", "manifest"),
               "output": ("dir", "name", "export_path", "overwrite")}
ADVANCED_EXAMPLE = '[train]\ngradient_checkpointing = true\n[dreambooth]\nnum_class_images = 100'


@dataclass(frozen=True)
class TrainSpec:
    """One row of the Train nodes' table: what the node trains and writes."""

    node_id: str
    display_name: str
    kind: str
    """The kind of result (`runfolder.MODEL_FOLDERS`): which models folder it lands in."""
    description: str
    input_names: dict[str, str] = field(default_factory=dict)
    """The node's own config fields and the inputs that set them, besides SHARED_INPUT_NAMES."""
    checkpoint_every: int = 100
    """Resumable checkpoints also guard against a crash; a full model's are large, so fewer."""


SUBJECT_INPUTS = {"data.trigger_word": "trigger_word", "data.class_noun": "class_noun"}
TRAIN_SPECS = {spec.node_id: spec for spec in (
    TrainSpec("FinetuneTrainLoRA", "Train LoRA", "lora",
              "Train a LoRA on your images in a separate process: live progress and samples, Cancel keeps a "
              "checkpoint and the next queue resumes it, an unchanged graph reuses the finished LoRA.",
              {**SUBJECT_INPUTS, "lora.algorithm": "algorithm", "lora.rank": "rank", "lora.alpha": "alpha"}),
    TrainSpec("FinetuneTrainCheckpoint", "Train Checkpoint (full fine-tune)", "checkpoint",
              "Fine-tune the whole model (UNet, optionally the text encoder) with EMA, and save a single-file "
              "checkpoint into models/checkpoints for Load Checkpoint. Needs far more memory than a LoRA.",
              SUBJECT_INPUTS, checkpoint_every=500),
    TrainSpec("FinetuneTrainTextualInversion", "Train Textual Inversion", "embedding",
              "Learns a new word (an embedding) for your subject or style; the model itself stays as it is. Saved "
              "into models/embeddings: write embedding:NAME in any prompt.",
              {"data.trigger_word": "trigger_word", "textual_inversion.initializer": "initializer",
               "textual_inversion.num_vectors": "num_vectors"}),
    TrainSpec("FinetuneTrainControlNet", "Train ControlNet", "controlnet",
              "Trains a ControlNet (started from the checkpoint's own UNet) to follow control maps: made from your "
              "images by a preprocessor, or given in a folder of maps named like the images. Saved into "
              "models/controlnet, for ControlNet Condition.",
              {"controlnet.preprocessor": "preprocessor", "controlnet.control_folder": "control_folder"}),
    TrainSpec("FinetuneTrainDDPO", "Train DDPO (reward fine-tune)", "lora",
              "Reinforcement learning (DDPO): the model samples images for your prompts, a reward scores them, and "
              "a LoRA learns to make higher-scoring images. Saved into models/loras.",
              {"ddpo.prompts": "prompts", "ddpo.reward": "reward", "ddpo.samples_per_epoch": "samples_per_epoch",
               "ddpo.sample_batch_size": "samples_per_epoch", "ddpo.sample_steps": "sampling_steps",
               "ddpo.guidance": "guidance", "ddpo.reward_model": "reward_model",
               "ddpo.aesthetic_head": "reward_model", "ddpo.reference_folder": "reward_model", "lora.rank": "rank",
               "lora.algorithm": "algorithm"}),
)}
"""Every Train node: its id, name, what it writes, its description, and the config fields its own inputs set."""


# ---- inputs the Train nodes share ----------------------------------------------------------------------------
def checkpoint_input(purpose: str = "to fine-tune") -> io.Combo.Input:
    return io.Combo.Input("base_checkpoint", options=folder_paths.get_filename_list("checkpoints"),
                          tooltip=f"The Stable Diffusion checkpoint (SD1.x, SD2.x or SDXL) {purpose}, from "
                                  "models/checkpoints.")


def steps_input(maximum: int = 100000, more: str = "") -> io.Int.Input:
    return io.Int.Input("steps", default=0, min=0, max=maximum,
                        tooltip="Training steps; 0 = automatic (100 per image, 400 to 1200)." + more)


def resolution_input() -> io.Int.Input:
    return io.Int.Input("resolution", default=0, min=0, max=4096, step=32,
                        tooltip="Training side length; 0 = the one set on Load Training Images.")


def batch_size_input(tooltip: str = "Items per step: smoother, more memory.") -> io.Int.Input:
    return io.Int.Input("batch_size", default=1, min=1, max=64, tooltip=tooltip)


def seed_and_name_inputs(default_name: str) -> list:
    return [io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, control_after_generate=False,
                         tooltip="Makes a run repeatable. Changing it starts a new training."),
            io.String.Input("name", default=default_name,
                            tooltip="File name of the result (without extension); if taken, _2, _3... is added.")]


def sample_inputs(default: str, replaced: str = "{trigger} is") -> list:
    return [io.String.Input("sample_prompts", multiline=True, default=default,
                            tooltip=f"Prompts for sample images during training, one per line; {replaced} "
                                    "replaced. Empty = no samples."),
            io.Int.Input("sample_every", default=100, min=0, max=100000,
                         tooltip="Make sample images every N steps (and always at the end); 0 = only at the end.")]


def advanced_input(sections: str = "", **placeholder: str) -> io.String.Input:
    return io.String.Input("advanced", multiline=True, default="", optional=True, **placeholder,
                           tooltip=f"More trainer settings as TOML or JSON, by section{sections} (see the README's "
                                   "config reference).")


def closing_inputs(sections: str = "", **placeholder: str) -> list:
    """`advanced`, then the inputs added after it: a saved graph's widget values stay in their places."""
    return [advanced_input(sections, **placeholder), optimizer_input()]


def run_inputs(default_name: str, default_lr: str, *, samples: str | None) -> list:
    """learning rate, batch, seed, name, sample prompts (when `samples` is their default), advanced, optimizer."""
    inputs = [learning_rate_input(default_lr), batch_size_input(), *seed_and_name_inputs(default_name)]
    if samples is not None:
        inputs += sample_inputs(samples)
    return inputs + closing_inputs()


def loss_chart_output() -> io.Image.Output:
    return io.Image.Output("loss_chart", display_name="loss_chart",
                           tooltip="The loss per step (thin) and its moving average (bold).")


def chart_and_sample_outputs() -> list[io.Output]:
    return [loss_chart_output(),
            io.Image.Output("samples", display_name="samples",
                            tooltip="The sample images of the last step (black when no sample prompts were given).")]


class TrainingNode(io.ComfyNode):
    """What every training node shares: its schema from its spec, its own input checks, and re-running whenever its
    checkpoint file or result name changed on disk."""

    SPEC: TrainSpec

    @classmethod
    def schema(cls, inputs: list, outputs: list) -> io.Schema:
        spec = cls.SPEC
        return io.Schema(node_id=spec.node_id, display_name=spec.display_name, category="finetune/train",
                         description=spec.description, inputs=inputs, outputs=outputs,
                         hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        # A checkpoint missing here (a workflow from another machine) ends as an error that says where to put it.
        return check_inputs(cls, inputs, later=("base_checkpoint",))

    @classmethod
    def fingerprint_inputs(cls, base_checkpoint: str = "", name: str = "", **kwargs) -> str:
        return fingerprint(base_checkpoint, name)


# ---- the job -----------------------------------------------------------------------------------------------------
def build_job(node: type[TrainingNode], inputs: dict[str, Any], settings: dict[str, Any],
              dataset: TrainingImages) -> TrainingJob:
    """A Train node's inputs (the shared ones in `inputs`, the node's own already in `settings`) as a TrainingJob
    with its config checked once; every problem is a NodeError naming the input to change."""
    spec = node.SPEC
    base_path = folder_paths.get_full_path("checkpoints", inputs["base_checkpoint"])
    if base_path is None:
        raise NodeError(f"`base_checkpoint`: {inputs['base_checkpoint']!r} is not in models/checkpoints — put the "
                        "file there and refresh the page (R), or pick another checkpoint")
    settings = _with_run_settings(spec, inputs, settings)
    advanced = (inputs.get("advanced") or "").strip()
    settings = merge(settings, parse_advanced(advanced))
    names = {**SHARED_INPUT_NAMES, **spec.input_names}
    name = inputs["name"].strip()
    try:
        cfg = checked_config(settings, Path(base_path), name)
    except FinetuneError as exc:
        error = node_error(exc, names)
        raise (NodeError(f"in `advanced`, {error}") if exc.where not in names and advanced else error) from None
    context = _executing_context()
    return TrainingJob(name=name, kind=spec.kind, base_name=inputs["base_checkpoint"], base_path=Path(base_path),
                       dataset=dataset, settings=settings,
                       cfg=cfg, node_id=str(node.hidden.unique_id or (context.node_id if context else "")),
                       prompt_id=context.prompt_id if context else "", input_names=names)


def _with_run_settings(spec: TrainSpec, inputs: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The shared inputs' settings and the checkpointing every node run gets, added to the node's own."""
    settings = {**settings, "train": {**settings["train"], "steps": inputs["steps"],
                                      "optimizer": inputs.get("optimizer", DEFAULT_OPTIMIZER),
                                      "learning_rate": inputs["learning_rate"], "batch_size": inputs["batch_size"],
                                      "seed": inputs["seed"]}}
    settings["output"] = {**settings.get("output", {}), "checkpoint_every": spec.checkpoint_every,
                          "keep_checkpoints": 1}
    return settings


def data_settings(dataset: TrainingImages, resolution: int, **extra: Any) -> dict[str, Any]:
    data = {**dataset.options, **extra}
    if resolution:
        data["resolution"] = resolution
    return data


def sample_settings(inputs: dict[str, Any], trigger: str = "", class_noun: str = "") -> dict[str, Any]:
    prompts = [fill_template(line, trigger, class_noun) for line in inputs.get("sample_prompts", "").splitlines()]
    return {"sample_prompts": [p for p in prompts if p], "sample_every": inputs.get("sample_every", 0)}


def parse_advanced(text: str) -> dict[str, Any]:
    text = text.strip()
    if not text:
        return {}
    try:
        data = json.loads(text) if text.startswith("{") else toml_reader.loads(text)
    except (json.JSONDecodeError, toml_reader.TOMLDecodeError) as exc:
        raise NodeError(f"`advanced` is not valid {'JSON' if text.startswith('{') else 'TOML'} ({exc}) — write "
                        f"sections of settings, e.g. {ADVANCED_EXAMPLE!r}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise NodeError("`advanced` must hold sections of settings — e.g. " + repr(ADVANCED_EXAMPLE))
    for section, keys in SET_BY_NODE.items():
        for key in keys:
            if key in data.get(section, {}):
                raise NodeError(f"`advanced` sets {section}.{key}, which this node sets itself — remove it (the "
                                "base model, the images and where files go come from the node's inputs)")
    return confine_settings(data)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def fingerprint(base_checkpoint: str, name: str) -> str:
    """What ComfyUI cannot see by itself: the base file replaced in place, or a result of ours deleted or replaced."""
    path = folder_paths.get_full_path("checkpoints", base_checkpoint) if base_checkpoint else None
    stat = Path(path).stat() if path else None
    missing = sorted(r.id for r in RunStore().list() if r.name == name.strip() and r.status == "succeeded"
                     and not still_ours(r))
    return json.dumps([base_checkpoint, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0, missing])


# ---- result images -----------------------------------------------------------------------------------------------
@dataclass
class ResultImages:
    """A finished run's chart and last samples, as IMAGE batches, and what the node shows of them."""

    chart: Any
    samples: Any
    shown: list[ui.SavedResult]

    def ui(self) -> ui.SavedImages:
        return ui.SavedImages(self.shown)


def result_images(record: RunRecord) -> ResultImages:
    """The loss chart (saved as the run's loss.png) and the last samples."""
    store = RunStore()
    chart = loss_chart(LossHistory.from_events(store.events(record.id)), title=f"{record.name} · {record.method}")
    return _with_samples(store, record, chart, "loss.png")


def reward_images(record: RunRecord) -> ResultImages:
    """The mean reward of each step's epoch, drawn as the loss chart draws the loss (the PPO loss itself says
    little), saved as the run's reward.png, and the last samples."""
    store = RunStore()
    history = LossHistory()
    for event in store.events(record.id):
        if event.get("event") == ProgressEvent.EVENT and "reward_mean" in event:
            history.steps.append(int(event["step"]))
            history.loss.append(float(event["reward_mean"]))
            history.smoothed.append(float(event["reward_mean"]))
    chart = loss_chart(history, title=f"{record.name} · mean reward of the sampled images")
    return _with_samples(store, record, chart, "reward.png")


def _with_samples(store: RunStore, record: RunRecord, chart, chart_name: str) -> ResultImages:
    from PIL import Image

    run_dir = store.run_dir(record.id)
    with atomic_path(run_dir / chart_name) as tmp:
        chart.save(tmp, format="PNG")
    sample_paths = [run_dir / p for p in record.outputs.get("samples", []) if (run_dir / p).is_file()]
    samples = []
    for path in sample_paths:
        with Image.open(path) as sample:
            samples.append(sample.convert("RGB"))
    output_dir = Path(folder_paths.get_output_directory())
    shown = [ui.SavedResult(p.name, p.parent.relative_to(output_dir).as_posix(), io.FolderType.output)
             for p in [run_dir / chart_name, *sample_paths] if p.is_relative_to(output_dir)]
    size = samples[0].size if samples else (64, 64)
    return ResultImages(image_batch([chart], chart.size), image_batch(samples, size), shown)


def _executing_context():
    from comfy_execution.utils import get_executing_context

    return get_executing_context()
