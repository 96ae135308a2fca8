"""Train Textual Inversion, Train ControlNet and Train DDPO (with DDPO Reward): as Train LoRA, the inputs become a
trainer config, the runner trains in a child process (progress, previews, Cancel, reuse of a finished run), and the
result lands in ComfyUI's models folder for its kind: embeddings, controlnet or loras."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import folder_paths
from comfy_api.v0_0_2 import io

from ..trainers.config import DDPO_DEFAULT_EPOCHS
from ..trainers.preprocess import NEEDS_DEPTH_MODEL, PREPROCESSORS
from .builder import (TRAIN_SPECS, TrainingNode, build_job, chart_and_sample_outputs, checkpoint_input,
                      data_settings, loss_chart_output, resolution_input, result_images, reward_images, run_inputs,
                      sample_settings, steps_input)
from .access import confine_data
from .caption import model_folder_path, model_folders
from .choices import DEFAULT_ALGORITHM, algorithm_input
from .runner import run_training
from .runs import RUNS_ROOT, lora_family
from .types import DatasetType, FileNameOutput, LoraType, NodeError, TrainedLora, TrainingImages, pixels_to_pil
from .validation import check_inputs

REWARD_FOLDER = "reward_models"
folder_paths.add_model_folder_path(REWARD_FOLDER, os.path.join(folder_paths.models_dir, REWARD_FOLDER))

RewardType = io.Custom("FINETUNE_REWARD")

WEIGHT_FREE_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility")
MODEL_REWARDS = ("aesthetic", "clip_score", "blip_score")
TRAINING_MAPS = tuple(p for p in PREPROCESSORS if p not in NEEDS_DEPTH_MODEL)
NO_FILE = "(none)"

@dataclass(frozen=True)
class RewardChoice:
    """What DDPO Reward hands to Train DDPO (FINETUNE_REWARD socket): a `ddpo` config section."""

    settings: dict[str, str]


class TrainTextualInversion(TrainingNode):
    SPEC = TRAIN_SPECS["FinetuneTrainTextualInversion"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema([
            checkpoint_input("to train for"),
            DatasetType.Input("dataset", tooltip="Images of the concept from Load Training Images."),
            io.String.Input("trigger_word", default="sks",
                            tooltip="A made-up word for the concept, used in the captions while training (it is "
                                    "added to every caption that lacks it). Not a word the model knows."),
            io.String.Input("initializer", default="",
                            tooltip="A word or two describing the concept, e.g. 'dog' or 'oil painting': the new "
                                    "embedding starts from their meaning. Empty = '*'."),
            io.Int.Input("num_vectors", default=1, min=1, max=75,
                         tooltip="How many tokens the embedding spans: 1-4 for an object, more for a style "
                                 "(each takes a place in the prompt's 75)."),
            steps_input(),
            resolution_input(),
            io.String.Input("prompt_template", default="a photo of {embedding}",
                            tooltip="The `prompt` output: {embedding} becomes embedding:NAME. Connect it to a "
                                    "CLIP Text Encode's text."),
            *run_inputs("my_embedding", "5e-3", samples="a photo of {trigger}"),
        ], [
            io.String.Output("embedding_name", display_name="embedding_name",
                             tooltip="Its name in models/embeddings; write embedding:NAME in a prompt."),
            io.String.Output("prompt", display_name="prompt", tooltip="prompt_template with the embedding in it."),
            *chart_and_sample_outputs(),
        ])

    @classmethod
    def execute(cls, dataset: TrainingImages, trigger_word: str, initializer: str, num_vectors: int,
                prompt_template: str, **inputs) -> io.NodeOutput:
        trigger = trigger_word.strip()
        settings = {"data": data_settings(dataset, inputs["resolution"], trigger_word=trigger),
                    "train": {"method": "textual_inversion"},
                    "textual_inversion": {"initializer": initializer.strip(), "num_vectors": num_vectors},
                    "output": sample_settings(inputs, trigger)}
        record = run_training(build_job(cls, inputs, settings, dataset))
        name = Path(record.outputs["embedding"]).stem
        images = result_images(record)
        prompt = prompt_template.replace("{embedding}", f"embedding:{name}")
        return io.NodeOutput(name, prompt, images.chart, images.samples, ui=images.ui())


class TrainControlNet(TrainingNode):
    SPEC = TRAIN_SPECS["FinetuneTrainControlNet"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema([
            checkpoint_input("to train for"),
            DatasetType.Input("dataset", tooltip="Training images and captions from Load Training Images."),
            io.Combo.Input("preprocessor", options=list(TRAINING_MAPS), default="canny",
                           tooltip="How each image's control map is made (the same as ControlNet Condition "
                                   "makes it when generating). Ignored when `control_folder` is set."),
            io.String.Input("control_folder", default="",
                            tooltip="Optional: a folder of ready-made maps (depth, pose, ...), one per training "
                                    "image with the same file name (img_01.png for img_01.jpg): a folder "
                                    "inside ComfyUI's input folder (relative to it), or one the person running "
                                    "ComfyUI allows (see the README's Safety section)."),
            steps_input(1000000, " ControlNets often need thousands before they follow the maps."),
            resolution_input(),
            *run_inputs("my_controlnet", "1e-5", samples=None),
        ], [
            FileNameOutput("controlnet_name", display_name="control_net",
                           tooltip="Its file in models/controlnet: connect it to ControlNet Condition's "
                                   "control_net (or the stock Load ControlNet Model's)."),
            loss_chart_output(),
        ])

    @classmethod
    def execute(cls, dataset: TrainingImages, preprocessor: str, control_folder: str, **inputs) -> io.NodeOutput:
        folder = resolve_control_folder(control_folder.strip())
        settings = {"data": data_settings(dataset, inputs["resolution"]), "train": {"method": "controlnet"},
                    "controlnet": {"preprocessor": preprocessor, "control_folder": folder}}
        record = run_training(build_job(cls, inputs, settings, dataset))
        images = result_images(record)
        return io.NodeOutput(record.outputs["controlnet"], images.chart, ui=images.ui())


def resolve_control_folder(text: str) -> str:
    """'' stays ''; a relative path is looked up in ComfyUI's input folder."""
    if not text:
        return ""
    path = confine_data(text, "control_folder")
    if not path.is_dir():
        raise NodeError(f"`control_folder`: {path} is not a folder — give the folder of control maps (a path, or a "
                        "folder inside ComfyUI's input folder), or leave it empty to make maps with `preprocessor`")
    return str(path)


class DDPOReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        models = [NO_FILE, *model_folders(REWARD_FOLDER)]
        heads = [NO_FILE, *(name for name in folder_paths.get_filename_list(REWARD_FOLDER)
                            if name.lower().endswith((".pth", ".pt", ".safetensors")))]
        return io.Schema(
            node_id="FinetuneDDPOReward",
            display_name="DDPO Reward",
            category="finetune/train",
            description=f"A reward that needs a model, for Train DDPO: put the model folders (and the aesthetic "
                        f"predictor file) into models/{REWARD_FOLDER}.",
            inputs=[
                io.Combo.Input("reward", options=list(MODEL_REWARDS), default="aesthetic",
                               tooltip="aesthetic: LAION's aesthetic predictor on CLIP ViT-L/14 image embeddings; "
                                       "clip_score: how well CLIP finds the prompt in the image; blip_score: BLIP's "
                                       "image-text matching probability."),
                io.Combo.Input("model", options=models, default=models[-1],
                               tooltip=f"A model folder in models/{REWARD_FOLDER}: CLIP (e.g. "
                                       "openai/clip-vit-large-patch14) for aesthetic and clip_score, a BLIP ITM "
                                       "model (e.g. Salesforce/blip-itm-base-coco) for blip_score."),
                io.Combo.Input("aesthetic_predictor", options=heads, default=heads[-1],
                               tooltip="aesthetic only: the predictor file, e.g. sac+logos+ava1-l14-linearMSE.pth."),
            ],
            outputs=[RewardType.Output("reward_model", display_name="reward",
                                       tooltip="Connect to Train DDPO's reward_model.")],
        )

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        # missing files end as errors that say where to put them
        return check_inputs(cls, inputs, later=("model", "aesthetic_predictor"))

    @classmethod
    def execute(cls, reward: str, model: str, aesthetic_predictor: str) -> io.NodeOutput:
        if model == NO_FILE:
            target = Path(folder_paths.get_folder_paths(REWARD_FOLDER)[0])
            raise NodeError(f"`model`: the {reward} reward needs a model and none is installed — download one into "
                            f"a folder inside {target} (config.json, weights, tokenizer and preprocessor files), "
                            "refresh the page and pick it")
        settings = {"reward": reward, "reward_model": str(model_folder_path(REWARD_FOLDER, model, "model"))}
        if reward == "aesthetic":
            head = folder_paths.get_full_path(REWARD_FOLDER, aesthetic_predictor)
            if head is None:
                raise NodeError(f"`aesthetic_predictor`: {aesthetic_predictor!r} is not in models/{REWARD_FOLDER} — "
                                "download sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor) "
                                "there, refresh the page and pick it")
            settings["aesthetic_head"] = head
        return io.NodeOutput(RewardChoice(settings))


class DDPOReferenceReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        models = [NO_FILE, *model_folders(REWARD_FOLDER)]
        return io.Schema(
            node_id="FinetuneDDPOReferenceReward",
            display_name="DDPO Reference Reward",
            category="finetune/train",
            description="A reward from images in your graph, for Train DDPO: the samples are rewarded for looking "
                        "like them (by colour and layout, or with a CLIP model by content and style).",
            inputs=[
                io.Image.Input("images", tooltip="The images the samples should come to look like: any IMAGE in the "
                                                 "graph (Load Image, a batch, another generation). At least 64 px."),
                io.Combo.Input("clip_model", options=models, default=NO_FILE,
                               tooltip=f"(none): colour and layout similarity, no weights needed. Or a CLIP model "
                                       f"folder in models/{REWARD_FOLDER} (e.g. openai/clip-vit-large-patch14): "
                                       "similarity of CLIP image embeddings, which follows content and style."),
            ],
            outputs=[RewardType.Output("reward_model", display_name="reward",
                                       tooltip="Connect to Train DDPO's reward_model.")],
        )

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        # a missing model folder ends as an error that says where to put it
        return check_inputs(cls, inputs, later=("clip_model",))

    @classmethod
    def execute(cls, images, clip_model: str) -> io.NodeOutput:
        height, width = int(images.shape[1]), int(images.shape[2])
        if min(height, width) < 64:
            raise NodeError(f"`images`: the reference images are {width}x{height}; they must be at least 64 px on "
                            "each side — upscale them (e.g. with Upscale Image) first")
        settings = {"reward": "reference_similarity", "reference_folder": str(save_references(images)),
                    "reward_model": ""}
        if clip_model != NO_FILE:
            settings["reward_model"] = str(model_folder_path(REWARD_FOLDER, clip_model, "clip_model"))
        return io.NodeOutput(RewardChoice(settings))


def save_references(images) -> Path:
    """The images as PNGs in a folder named by their content (the same images, the same folder: a re-queued graph
    is recognised as unchanged), written under a temporary name and renamed whole."""
    array = (images.detach().cpu().float().clamp(0, 1) * 255).round().byte().numpy()
    folder = RUNS_ROOT() / ".references" / hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()[:16]
    if folder.is_dir():
        return folder
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    for n, picture in enumerate(images):
        pixels_to_pil(picture).save(partial / f"reference_{n:03d}.png")
    try:
        partial.rename(folder)
    except OSError:  # another queue wrote the same images first
        if not folder.is_dir():
            raise
    return folder


class TrainDDPO(TrainingNode):
    SPEC = TRAIN_SPECS["FinetuneTrainDDPO"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.schema([
            checkpoint_input("to train for"),
            io.String.Input("prompts", multiline=True, default="a photo of a cat\na photo of a dog",
                            tooltip="Prompts to sample from, one per line."),
            io.Combo.Input("reward", options=list(WEIGHT_FREE_REWARDS), default=WEIGHT_FREE_REWARDS[0],
                           tooltip="jpeg_compressibility: smaller JPEG files (simpler, smoother images); "
                                   "jpeg_incompressibility: larger ones (more detail). Replaced by `reward_model` "
                                   "when that is connected."),
            io.Int.Input("steps", default=0, min=0, max=1000000,
                         tooltip=f"Optimizer steps; 0 = {DDPO_DEFAULT_EPOCHS} epochs of sampling and training."),
            io.Int.Input("samples_per_epoch", default=32, min=1, max=4096,
                         tooltip="Images sampled and scored per epoch (a multiple of batch_size)."),
            io.Int.Input("sampling_steps", default=50, min=2, max=1000,
                         tooltip="DDIM steps per sampled image; each is trained on."),
            io.Float.Input("guidance", default=5.0, min=1.0, max=30.0, step=0.1,
                           tooltip="Classifier-free guidance while sampling (1 = none, twice as fast)."),
            io.Int.Input("resolution", default=512, min=32, max=4096, step=32, tooltip="Side of sampled images."),
            io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA size."),
            *run_inputs("my_ddpo_lora", "3e-4", samples="{first prompt}"),
            RewardType.Input("reward_model", optional=True,
                             tooltip="A reward from DDPO Reward (aesthetic, CLIP or BLIP score: needs a model) or "
                                     "from DDPO Reference Reward (look like images in the graph)."),
            algorithm_input(),
        ], [
            LoraType.Output("lora", display_name="lora", tooltip="The trained LoRA, for Apply LoRA."),
            io.String.Output("lora_name", display_name="lora_name", tooltip="Its file name in models/loras."),
            io.Image.Output("reward_chart", display_name="reward_chart",
                            tooltip="The mean reward of each epoch's samples, per step."),
            io.Image.Output("samples", display_name="samples", tooltip="Sample images of the last step."),
        ])

    @classmethod
    def execute(cls, prompts: str, reward: str, samples_per_epoch: int, sampling_steps: int, guidance: float,
                rank: int, reward_model: RewardChoice | None = None, algorithm: str = DEFAULT_ALGORITHM,
                **inputs) -> io.NodeOutput:
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        inputs["sample_prompts"] = inputs.get("sample_prompts", "").replace("{first prompt}", lines[0] if lines else "")
        ddpo = {"prompts": lines, "reward": reward, "samples_per_epoch": samples_per_epoch,
                "sample_batch_size": max(n for n in range(1, 9) if samples_per_epoch % n == 0),
                "sample_steps": sampling_steps, "guidance": guidance,
                **(reward_model.settings if reward_model is not None else {})}
        settings = {"data": {"resolution": inputs["resolution"]}, "train": {"method": "ddpo"}, "ddpo": ddpo,
                    "lora": {"algorithm": algorithm, "rank": rank, "alpha": float(rank)},
                    "output": sample_settings(inputs)}
        record = run_training(build_job(cls, inputs, settings, TrainingImages(entries=(), source="ddpo prompts")))
        path = Path(record.outputs["path"])
        lora = TrainedLora(name=record.outputs["lora"], path=str(path), family=lora_family(path))
        images = reward_images(record)
        return io.NodeOutput(lora, lora.name, images.chart, images.samples, ui=images.ui())


NODES = [TrainTextualInversion, TrainControlNet, DDPOReward, DDPOReferenceReward, TrainDDPO]
