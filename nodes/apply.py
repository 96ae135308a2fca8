"""Apply LoRA: a LoRA (just trained, or any file in models/loras) on a MODEL and CLIP through ComfyUI's own
`load_lora_for_models`, as LoraLoader does, so several stack; it refuses a LoRA made for another model family, or
one of which nothing applies, and reports how much did."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import folder_paths
from comfy_api.v0_0_2 import io

from .types import LoraType, NodeError, TrainedLora
from .validation import check_inputs

NO_LORA = "(none)"
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
NOT_LOADED_PREFIX = "lora key not loaded: "
SHOWN_UNUSED = 5


class ApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="FinetuneApplyLoRA",
            display_name="Apply LoRA",
            category="finetune/generate",
            description="Applies a LoRA to the model and its text encoder, like Load LoRA (chain several to stack "
                        "them), after checking that it was made for this model family. LoRA, LoCon, LoHa, LoKr and "
                        "DoRA files all apply. The report says which kind it is and how many layers it changed.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the LoRA to."),
                io.Clip.Input("clip", tooltip="The text encoder (CLIP) to apply the LoRA to."),
                io.Combo.Input("lora_name", options=[NO_LORA, *loras], default=loras[0] if loras else NO_LORA,
                               tooltip="A LoRA file from models/loras. Ignored when `lora` is connected."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the diffusion model; 0 leaves it as it is, "
                                       "negative values push away from what it learned."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the text encoder (its trigger word's meaning)."),
                LoraType.Input("lora", optional=True,
                               tooltip="A LoRA straight from a Train LoRA node; used instead of `lora_name`."),
            ],
            outputs=[
                io.Model.Output("lora_model", display_name="model",
                                tooltip="The diffusion model with the LoRA applied."),
                io.Clip.Output("lora_clip", display_name="clip", tooltip="The text encoder with the LoRA applied."),
                io.String.Output("report", display_name="report",
                                 tooltip="Which LoRA, its family and kind (LoRA, LoHa, LoKr or DoRA), and how many of "
                                         "its layers were applied to the model and to the text encoder."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        # A LoRA missing here (a workflow from another machine) ends as an error that says where to put it.
        return check_inputs(cls, inputs, later=("lora_name",))

    @classmethod
    def execute(cls, model, clip, lora_name: str, strength_model: float, strength_clip: float,
                lora: TrainedLora | None = None) -> io.NodeOutput:
        chosen = choose_lora(lora_name, lora)
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip, f"{chosen.name}: both strengths are 0, nothing applied")
        return io.NodeOutput(*apply_lora(model, clip, chosen, strength_model, strength_clip))


class LoraChoice(NamedTuple):
    path: Path
    name: str
    input_name: str
    """The input it came from, for error messages."""


def choose_lora(lora_name: str, lora: TrainedLora | None) -> LoraChoice:
    if lora is not None:
        if not os.path.isfile(lora.path):
            raise NodeError(f"`lora`: the trained LoRA file {lora.path} is gone — train again, or pick a file "
                            "in `lora_name` and disconnect `lora`")
        return LoraChoice(Path(lora.path), lora.name, "lora")
    if lora_name == NO_LORA:
        raise NodeError("no LoRA chosen — pick a file in `lora_name`, or connect a trained LoRA to `lora`")
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        folders = " or ".join(folder_paths.get_folder_paths("loras"))
        raise NodeError(f"`lora_name`: {lora_name} is not in {folders} — put the file there (then refresh the "
                        "page), or pick another LoRA")
    return LoraChoice(Path(path), lora_name, "lora_name")


def apply_lora(model, clip, chosen: LoraChoice, strength_model: float, strength_clip: float) -> tuple[Any, Any, str]:
    import comfy.sd

    from ..trainers.export.lora import ALGORITHM_NAMES, lora_algorithm, lora_family

    state, metadata = read_lora_file(chosen)
    family, model_family = lora_family(state, metadata), family_of(model)
    label = f"`{chosen.input_name}`: {chosen.name}"
    if family is not None and family != model_family:
        raise NodeError(f"{label} is an {FAMILY_NAMES[family]} LoRA but the model is {describe_model(model)} — use "
                        f"a LoRA trained on this checkpoint's family, or load an {FAMILY_NAMES[family]} checkpoint "
                        "for this LoRA")
    with logged_lines(NOT_LOADED_PREFIX) as not_loaded:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, state, strength_model, strength_clip)
    unet_layers = patch_count(new_model) - patch_count(model)
    text_layers = patch_count(new_clip.patcher) - patch_count(clip.patcher)
    if unet_layers + text_layers == 0:
        raise NodeError(f"{label}: none of its {len(state)} tensors matches a layer of "
                        f"{describe_model(model)} — is it a LoRA for another kind of model? Use one trained on "
                        "this checkpoint's family")
    report = (f"{chosen.name} ({FAMILY_NAMES.get(family, 'family unknown')} "
              f"{ALGORITHM_NAMES[lora_algorithm(state)]}) on {describe_model(model)}: "
              f"{unet_layers} model layers (strength {strength_model:g}) and {text_layers} text-encoder layers "
              f"(strength {strength_clip:g}) patched")
    if not_loaded:
        unused = [line[len(NOT_LOADED_PREFIX):] for line in not_loaded]
        shown = ", ".join(unused[:SHOWN_UNUSED]) + (", ..." if len(unused) > SHOWN_UNUSED else "")
        report += f"; {len(unused)} of its {len(state)} tensors matched nothing and were skipped: {shown}"
    return new_model, new_clip, report


_CACHE: dict[str, Any] = {}


def read_lora_file(chosen: LoraChoice) -> tuple[dict, dict]:
    """The LoRA's tensors and metadata; the last file read is kept, as LoraLoader keeps it, for the next run."""
    import pickle

    import comfy.utils
    from safetensors import SafetensorError

    stat = chosen.path.stat()
    key = (str(chosen.path), stat.st_size, stat.st_mtime_ns)
    if _CACHE.get("key") != key:
        try:
            state, metadata = comfy.utils.load_torch_file(str(chosen.path), safe_load=True, return_metadata=True)
        except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise NodeError(f"`{chosen.input_name}`: cannot read {chosen.name} ({first}) — the file is damaged or "
                            "not a LoRA: download or export it again") from None
        _CACHE.update(key=key, value=(state, metadata or {}))
    return _CACHE["value"]


def family_of(model) -> str | None:
    """"sd1", "sd2" or "sdxl" for a ComfyUI MODEL of those families (SDXL's distilled variants included)."""
    import comfy.supported_models as supported

    config = model.model.model_config
    for config_class, family in ((supported.SDXL, "sdxl"), (supported.SD20, "sd2"), (supported.SD15, "sd1")):
        if isinstance(config, config_class):
            return family
    return None


def describe_model(model) -> str:
    family = family_of(model)
    kind = type(model.model.model_config).__name__
    return f"{FAMILY_NAMES[family]} ({kind})" if family else f"a {kind} model"


def patch_count(patcher) -> int:
    return sum(len(patches) for patches in patcher.patches.values())


@contextmanager
def logged_lines(prefix: str) -> Iterator[list[str]]:
    """Collect the log messages starting with `prefix` that ComfyUI writes meanwhile."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(prefix):
                lines.append(message)

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


NODES = [ApplyLoRA]
