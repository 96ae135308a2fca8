"""Train LoRA and Train Checkpoint: the node inputs become a trainer config, the runner trains (or reuses a
finished run), and the result lands in ComfyUI's models folder under a name no one else's file has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comfy_api.v0_0_2 import io

from .builder import (ADVANCED_EXAMPLE, TRAIN_SPECS, TrainingNode, batch_size_input, build_job,
                      chart_and_sample_outputs, checkpoint_input, closing_inputs, data_settings,
                      resolution_input, result_images, sample_inputs, sample_settings, seed_and_name_inputs,
                      steps_input)
from .choices import DEFAULT_ALGORITHM, algorithm_input, learning_rate_input
from .runner import TrainingJob, run_training
from .runs import lora_family
from .types import DatasetType, FileNameOutput, LoraType, NodeError, TrainedLora

LORA_METHODS = {"LoRA": False, "DreamBooth LoRA (prior preservation)": True}
CHECKPOINT_METHODS = {"Full fine-tune": False, "DreamBooth (prior preservation)": True}


def subject_inputs(methods: dict[str, bool], default_name: str, own: list) -> list:
    """The inputs of a node that trains a subject from images: the shared ones, with the node's `own` before seed."""
    return [
        checkpoint_input(),
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
        steps_input(),
        learning_rate_input("1e-4 for LoRA, 2e-6 for a full fine-tune"),
        resolution_input(),
        batch_size_input("Images per step. More is smoother but needs more memory."),
        io.Boolean.Input("train_text_encoder", default=False,
                         tooltip="Also train the text encoder: learns the trigger word better, uses more memory."),
        *own,
        *seed_and_name_inputs(default_name),
        *sample_inputs("a photo of {trigger} {class}", replaced="{trigger} and {class} are"),
        *closing_inputs(": [data] [train] [lora] [full] [dreambooth] [output]", placeholder=ADVANCED_EXAMPLE),
    ]


def subject_job(node: type[TrainingNode], methods: dict[str, bool], method: str, inputs: dict[str, Any],
                own: dict[str, Any]) -> TrainingJob:
    """A LoRA's or a full fine-tune's job: the subject's data and samples, DreamBooth when the method says so."""
    if inputs["method"] not in methods:
        raise NodeError(f"`method`: {inputs['method']!r} is not a method of this node — use one of "
                        f"{', '.join(methods)}")
    dataset, trigger, class_noun = inputs["dataset"], inputs["trigger_word"].strip(), inputs["class_noun"].strip()
    settings = {"data": data_settings(dataset, inputs["resolution"], trigger_word=trigger, class_noun=class_noun),
                "train": {"method": method}, "dreambooth": {"enabled": methods[inputs["method"]]},
                "output": sample_settings(inputs, trigger, class_noun), **own}
    return build_job(node, inputs, settings, dataset)


class TrainLoRA(TrainingNode):
    SPEC = TRAIN_SPECS["FinetuneTrainLoRA"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        own = [io.Int.Input("rank", default=16, min=1, max=256,
                            tooltip="LoRA size: 4-8 for a face or object, 16-32 for a style; larger learns more "
                                    "detail and makes a bigger file."),
               io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5,
                              tooltip="Scales the LoRA's effect while training; the rank or half of it is usual.")]
        return cls.schema([*subject_inputs(LORA_METHODS, "my_lora", own), algorithm_input()], [
            LoraType.Output("lora", display_name="lora", tooltip="The trained LoRA, for Apply LoRA."),
            io.String.Output("lora_name", display_name="lora_name",
                             tooltip="Its file name in models/loras, usable with ComfyUI's own Load LoRA "
                                     "(refresh the page to see it there)."),
            *chart_and_sample_outputs(),
        ])

    @classmethod
    def execute(cls, rank: int, alpha: float, train_text_encoder: bool, algorithm: str = DEFAULT_ALGORITHM,
                **inputs) -> io.NodeOutput:
        job = subject_job(cls, LORA_METHODS, "lora", inputs, {"lora": {
            "algorithm": algorithm, "rank": rank, "alpha": alpha, "train_text_encoder": train_text_encoder}})
        record = run_training(job)
        path = Path(record.outputs["path"])
        lora = TrainedLora(name=record.outputs["lora"], path=str(path), trigger_word=record.trigger_word,
                           family=lora_family(path))
        images = result_images(record)
        return io.NodeOutput(lora, lora.name, images.chart, images.samples, ui=images.ui())


class TrainCheckpoint(TrainingNode):
    SPEC = TRAIN_SPECS["FinetuneTrainCheckpoint"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        own = [io.Boolean.Input("ema", default=True,
                                tooltip="Keep an exponential moving average of the weights and save that: "
                                        "steadier results.")]
        return cls.schema(subject_inputs(CHECKPOINT_METHODS, "my_finetune", own), [
            FileNameOutput("checkpoint_name", display_name="ckpt_name",
                           tooltip="Its file name in models/checkpoints: connect it to Load Checkpoint's "
                                   "ckpt_name to use it in the same graph."),
            *chart_and_sample_outputs(),
        ])

    @classmethod
    def execute(cls, ema: bool, train_text_encoder: bool, **inputs) -> io.NodeOutput:
        job = subject_job(cls, CHECKPOINT_METHODS, "full", inputs,
                          {"full": {"ema": ema, "train_text_encoder": train_text_encoder}})
        record = run_training(job)
        images = result_images(record)
        return io.NodeOutput(record.outputs["checkpoint"], images.chart, images.samples, ui=images.ui())


NODES = [TrainLoRA, TrainCheckpoint]
