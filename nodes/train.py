"""Train LoRA and Train Checkpoint: the node inputs become a trainer config, the runner trains (or reuses a
finished run), and the result lands in ComfyUI's models folder under a name no one else's file has."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..trainers.config import fill_template
from ..trainers.errors import FinetuneError
from ..trainers.io import atomic_path
from .charts import LossHistory, loss_chart
from .runner import TrainingJob, run_training
from .runs import RunRecord, RunStore, lora_family
from .types import DatasetType, FileNameOutput, LoraType, NodeError, TrainedLora, image_batch, node_error

TRAINER_NEEDS = ("diffusers", "peft", "transformers", "accelerate", "safetensors")
# The trainer runs in its own process: here it is enough to know its packages are installed, without the seconds
# that importing them would add to ComfyUI's start.
for _package in TRAINER_NEEDS:
    if importlib.util.find_spec(_package) is None:
        raise ModuleNotFoundError(f"No module named '{_package}'", name=_package)

LORA_METHODS = {"LoRA": False, "DreamBooth LoRA (prior preservation)": True}
CHECKPOINT_METHODS = {"Full fine-tune": False, "DreamBooth (prior preservation)": True}
INPUTS = {"model.base": "base_checkpoint", "data.trigger_word": "trigger_word", "data.class_noun": "class_noun",
          "data.resolution": "resolution", "train.steps": "steps", "train.learning_rate": "learning_rate",
          "train.batch_size": "batch_size", "train.seed": "seed", "lora.rank": "rank", "lora.alpha": "alpha",
          "output.name": "name", "output.sample_every": "sample_every"}
SET_BY_NODE = {"model": ("base",), "data": ("folder", "manifest"),
               "output": ("dir", "name", "export_path", "overwrite")}
CHECKPOINT_EVERY = {"lora": 100, "full": 500}
"""Resumable checkpoints also guard against a crash; a full model's are large, so fewer."""
ADVANCED_EXAMPLE = '[train]\ngradient_checkpointing = true\n[dreambooth]\nnum_class_images = 100'


def base_inputs(methods: dict[str, bool], default_name: str) -> tuple[list, list]:
    """The inputs both Train nodes share, split where the method-specific ones go."""
    head = [
        io.Combo.Input("base_checkpoint", options=folder_paths.get_filename_list("checkpoints"),
                       tooltip="The Stable Diffusion checkpoint (SD1.x, SD2.x or SDXL) to fine-tune, from "
                               "models/checkpoints."),
        DatasetType.Input("dataset", tooltip="Training images and captions from Load Training Images (optionally "
                                             "captioned by a caption node)."),
        io.Combo.Input("method", options=list(methods), default=next(iter(methods)),
                       tooltip="DreamBooth also trains on class images the base model generates ('a photo of "
                               "<class noun>'), so the model keeps knowing the class; set how many under "
                               "[dreambooth] num_class_images in `advanced` (default 50)."),
        io.String.Input("trigger_word", default="sks",
                        tooltip="A rare word that will stand for your subject; put it in your prompts later. "
                                "It is added to every caption that lacks it."),
        io.String.Input("class_noun", default="",
                        tooltip="What the subject is, e.g. 'person', 'dog', 'style'. Needed for DreamBooth."),
        io.Int.Input("steps", default=0, min=0, max=100000,
                     tooltip="Training steps; 0 = automatic (100 per image, 400 to 1200)."),
    ]
    tail = [
        io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=0.0000001,
                       tooltip="0 = the method's default (1e-4 for LoRA, 2e-6 for a full fine-tune)."),
        io.Int.Input("resolution", default=0, min=0, max=4096, step=64,
                     tooltip="Training side length; 0 = the one set on Load Training Images."),
        io.Int.Input("batch_size", default=1, min=1, max=64,
                     tooltip="Images per step. More is smoother but needs more memory."),
        io.Boolean.Input("train_text_encoder", default=False,
                         tooltip="Also train the text encoder: learns the trigger word better, uses more memory."),
    ]
    closing = [
        io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, control_after_generate=False,
                     tooltip="Makes a run repeatable. Changing it starts a new training."),
        io.String.Input("name", default=default_name,
                        tooltip="File name of the result (without extension); if taken, _2, _3... is added."),
        io.String.Input("sample_prompts", multiline=True, default="a photo of {trigger} {class}",
                        tooltip="Prompts for sample images during training, one per line; {trigger} and {class} "
                                "are replaced. Empty = no samples."),
        io.Int.Input("sample_every", default=100, min=0, max=100000,
                     tooltip="Make sample images every N steps (and always at the end); 0 = only at the end."),
        io.String.Input("advanced", multiline=True, default="", optional=True, placeholder=ADVANCED_EXAMPLE,
                        tooltip="More trainer settings as TOML or JSON, by section: [data] [train] [lora] [full] "
                                "[dreambooth] [output] (see the README's config reference)."),
    ]
    return head + tail, closing


def chart_and_sample_outputs() -> list[io.Output]:
    return [io.Image.Output("loss_chart", display_name="loss_chart",
                            tooltip="The loss per step (thin) and its moving average (bold)."),
            io.Image.Output("samples", display_name="samples",
                            tooltip="The sample images of the last step (black when no sample prompts were given).")]


class TrainingNode(io.ComfyNode):
    """What every training node shares: its own input checks, and re-running whenever its checkpoint file or
    result name changed on disk."""

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool:
        # Taking over ComfyUI's own list/range checks lets a missing checkpoint or a bad value end as an execution
        # error that names the input and the fix.
        return True

    @classmethod
    def fingerprint_inputs(cls, base_checkpoint: str = "", name: str = "", **kwargs) -> str:
        return fingerprint(base_checkpoint, name)


class TrainLoRA(TrainingNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        common, closing = base_inputs(LORA_METHODS, "my_lora")
        return io.Schema(
            node_id="FinetuneTrainLoRA",
            display_name="Train LoRA",
            category="finetune/train",
            description="Train a LoRA on your images in a separate process: live progress and samples, Cancel keeps "
                        "a checkpoint and the next queue resumes it, an unchanged graph reuses the finished LoRA.",
            inputs=[*common,
                    io.Int.Input("rank", default=16, min=1, max=256,
                                 tooltip="LoRA size: 4-8 for a face or object, 16-32 for a style; larger learns more "
                                         "detail and makes a bigger file."),
                    io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5,
                                   tooltip="Scales the LoRA's effect while training; the rank or half of it is usual."),
                    *closing],
            outputs=[
                LoraType.Output("lora", display_name="lora", tooltip="The trained LoRA, for Apply LoRA."),
                io.String.Output("lora_name", display_name="lora_name",
                                 tooltip="Its file name in models/loras, usable with ComfyUI's own Load LoRA "
                                         "(refresh the page to see it there)."),
                *chart_and_sample_outputs(),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, rank: int, alpha: float, train_text_encoder: bool, **inputs) -> io.NodeOutput:
        job = make_job(cls, "lora", LORA_METHODS, inputs,
                       {"lora": {"rank": rank, "alpha": alpha, "train_text_encoder": train_text_encoder}})
        record = run_training(job)
        path = Path(record.outputs["path"])
        lora = TrainedLora(name=record.outputs["lora"], path=str(path), trigger_word=record.trigger_word,
                           family=lora_family(path))
        chart, samples, shown = result_images(record)
        return io.NodeOutput(lora, lora.name, chart, samples, ui=shown)


class TrainCheckpoint(TrainingNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        common, closing = base_inputs(CHECKPOINT_METHODS, "my_finetune")
        return io.Schema(
            node_id="FinetuneTrainCheckpoint",
            display_name="Train Checkpoint (full fine-tune)",
            category="finetune/train",
            description="Fine-tune the whole model (UNet, optionally the text encoder) with EMA, and save a "
                        "single-file checkpoint into models/checkpoints for Load Checkpoint. Needs far more memory "
                        "than a LoRA.",
            inputs=[*common,
                    io.Boolean.Input("ema", default=True,
                                     tooltip="Keep an exponential moving average of the weights and save that: "
                                             "steadier results."),
                    *closing],
            outputs=[
                FileNameOutput("checkpoint_name", display_name="ckpt_name",
                               tooltip="Its file name in models/checkpoints: connect it to Load Checkpoint's "
                                       "ckpt_name to use it in the same graph."),
                *chart_and_sample_outputs(),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ema: bool, train_text_encoder: bool, **inputs) -> io.NodeOutput:
        job = make_job(cls, "checkpoint", CHECKPOINT_METHODS, inputs,
                       {"full": {"ema": ema, "train_text_encoder": train_text_encoder}})
        record = run_training(job)
        chart, samples, shown = result_images(record)
        return io.NodeOutput(record.outputs["checkpoint"], chart, samples, ui=shown)


def make_job(node: type[io.ComfyNode], kind: str, methods: dict[str, bool], inputs: dict[str, Any],
             specific: dict[str, Any]) -> TrainingJob:
    """The node's inputs as a checked TrainingJob; every problem is a NodeError naming the input to change."""
    base_path = folder_paths.get_full_path("checkpoints", inputs["base_checkpoint"])
    if base_path is None:
        raise NodeError(f"`base_checkpoint`: {inputs['base_checkpoint']!r} is not in models/checkpoints — put the "
                        "file there and refresh the page (R), or pick another checkpoint")
    if inputs["method"] not in methods:
        raise NodeError(f"`method`: {inputs['method']!r} is not a method of this node — use one of "
                        f"{', '.join(methods)}")
    dataset, trigger, class_noun = inputs["dataset"], inputs["trigger_word"].strip(), inputs["class_noun"].strip()
    data = {**dataset.options, "trigger_word": trigger, "class_noun": class_noun}
    if inputs["resolution"]:
        data["resolution"] = inputs["resolution"]
    prompts = [fill_template(line, trigger, class_noun) for line in inputs["sample_prompts"].splitlines()]
    settings = {
        "data": data,
        "train": {"method": "lora" if kind == "lora" else "full", "steps": inputs["steps"],
                  "learning_rate": inputs["learning_rate"], "batch_size": inputs["batch_size"], "seed": inputs["seed"]},
        "dreambooth": {"enabled": methods[inputs["method"]]},
        "output": {"sample_prompts": [p for p in prompts if p], "sample_every": inputs["sample_every"],
                   "checkpoint_every": CHECKPOINT_EVERY["lora" if kind == "lora" else "full"], "keep_checkpoints": 1},
        **specific,
    }
    settings = merge(settings, parse_advanced(inputs.get("advanced") or ""))
    context = _executing_context()
    job = TrainingJob(name=inputs["name"].strip(), kind=kind, base_name=inputs["base_checkpoint"],
                      base_path=Path(base_path), dataset=dataset, settings=settings,
                      node_id=str(node.hidden.unique_id or ""), prompt_id=context.prompt_id if context else "",
                      input_names=INPUTS)
    try:
        job.config()
    except FinetuneError as exc:
        error = node_error(exc, INPUTS)
        from_advanced = exc.where not in INPUTS and (inputs.get("advanced") or "").strip()
        raise (NodeError(f"in `advanced`, {error}") if from_advanced else error) from None
    return job


def parse_advanced(text: str) -> dict[str, Any]:
    text = text.strip()
    if not text:
        return {}
    try:
        data = json.loads(text) if text.startswith("{") else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NodeError(f"`advanced` is not valid {'JSON' if text.startswith('{') else 'TOML'} ({exc}) — write "
                        f"sections of settings, e.g. {ADVANCED_EXAMPLE!r}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise NodeError("`advanced` must hold sections of settings — e.g. " + repr(ADVANCED_EXAMPLE))
    for section, keys in SET_BY_NODE.items():
        for key in keys:
            if key in data.get(section, {}):
                raise NodeError(f"`advanced` sets {section}.{key}, which this node sets itself — remove it (the "
                                "base model, the images and where files go come from the node's inputs)")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def fingerprint(base_checkpoint: str, name: str) -> str:
    """What ComfyUI cannot see by itself: the base file replaced in place, or a result of ours deleted."""
    path = folder_paths.get_full_path("checkpoints", base_checkpoint) if base_checkpoint else None
    stat = Path(path).stat() if path else None
    missing = sorted(r.id for r in RunStore().list() if r.name == name.strip() and r.status == "succeeded"
                     and not Path(r.outputs.get("path", "")).is_file())
    return json.dumps([base_checkpoint, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0, missing])


def result_images(record: RunRecord) -> tuple[Any, Any, ui.SavedImages]:
    """The loss chart (also saved as the run's loss.png) and the last samples, as IMAGE batches and node previews."""
    from PIL import Image

    store = RunStore()
    run_dir = store.run_dir(record.id)
    chart = loss_chart(LossHistory.from_events(store.events(record.id)), title=f"{record.name} · {record.method}")
    with atomic_path(run_dir / "loss.png") as tmp:
        chart.save(tmp, format="PNG")
    sample_paths = [run_dir / p for p in record.outputs.get("samples", []) if (run_dir / p).is_file()]
    samples = []
    for path in sample_paths:
        with Image.open(path) as sample:
            samples.append(sample.convert("RGB"))
    size = samples[0].size if samples else (64, 64)
    output_dir = Path(folder_paths.get_output_directory())
    shown = [ui.SavedResult(p.name, p.parent.relative_to(output_dir).as_posix(), io.FolderType.output)
             for p in [run_dir / "loss.png", *sample_paths] if p.is_relative_to(output_dir)]
    return image_batch([chart], chart.size), image_batch(samples, size), ui.SavedImages(shown)


def _executing_context():
    from comfy_execution.utils import get_executing_context

    return get_executing_context()


NODES = [TrainLoRA, TrainCheckpoint]
