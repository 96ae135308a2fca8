"""Train Textual Inversion, Train ControlNet and Train DDPO on a real ComfyUI server: every bad input ends as one
execution error that names the input and the fix, before any step is trained, and the server runs the next graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.comfy.client import PromptRejected, assert_clear_node_error
from tests.comfy.training import TINY_RUN, sample_images_in

MISSING_CHECKPOINT = ({"base_checkpoint": "no_such_model.safetensors"},
                      ["`base_checkpoint`", "no_such_model.safetensors", "models/checkpoints"])


@pytest.fixture(scope="module")
def concept(comfy_server) -> Path:
    """Four captioned sample images in the server's input folder, with a folder of control maps of another shape
    and an empty one beside them."""
    folder = sample_images_in(comfy_server.input_dir, "method_concept")
    (comfy_server.input_dir / "empty_maps").mkdir(exist_ok=True)
    wide = comfy_server.input_dir / "wide_maps"
    wide.mkdir(exist_ok=True)
    for image in folder.glob("*.png"):
        Image.new("RGB", (256, 64), "white").save(wide / image.name)
    return folder


def with_defaults(comfy, class_type: str, **inputs) -> dict:
    """A node of `class_type` with every input that has a default at it, then `inputs`."""
    info = comfy.object_info(class_type)["input"]
    specs = {**info.get("required", {}), **info.get("optional", {})}
    values = {name: spec[1]["default"] for name, spec in specs.items()
              if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
    return {"class_type": class_type, "inputs": {**values, **inputs}}


def images_node(folder: Path) -> dict:
    return {"class_type": "FinetuneLoadTrainingImages",
            "inputs": {"folder": "(none)", "path": str(folder), "repeats": 1, "resolution": 64, "crop": "center",
                       "flip": False, "bucketing": False}}


def method_graph(comfy, class_type: str, checkpoint: str, folder: Path, changes: dict) -> dict:
    common = dict(base_checkpoint=checkpoint, steps=2, name="never_trained", advanced=TINY_RUN)
    if class_type == "FinetuneTrainDDPO":
        node = with_defaults(comfy, class_type, **common, samples_per_epoch=2, sampling_steps=2, guidance=1.0,
                             resolution=64, sample_prompts="")
        return {"2": {**node, "inputs": {**node["inputs"], **changes}}}
    extra = {"sample_prompts": ""} if class_type == "FinetuneTrainTextualInversion" else {}
    node = with_defaults(comfy, class_type, **common, **extra, dataset=["1", 0])
    return {"1": images_node(folder), "2": {**node, "inputs": {**node["inputs"], **changes}}}


def quick_graph(folder: Path) -> dict:
    return {"1": images_node(folder), "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}


TI, CN, DDPO = "FinetuneTrainTextualInversion", "FinetuneTrainControlNet", "FinetuneTrainDDPO"
CASES = [
    (TI, "missing checkpoint", *MISSING_CHECKPOINT),
    (TI, "no trigger word", {"trigger_word": "  "}, ["`trigger_word`", "needs one trigger word"]),
    (TI, "two trigger words", {"trigger_word": "my cat"}, ["`trigger_word`", "single made-up word"]),
    (TI, "a word the tokenizer knows", {"trigger_word": "cat"},
     ["`trigger_word`", "'cat' is already a token", "made-up word"]),
    (TI, "unusable name", {"name": "a/b"}, ["`name`", "'a/b' is not a usable file name"]),
    (CN, "missing checkpoint", *MISSING_CHECKPOINT),
    (CN, "missing control folder", {"control_folder": "no_such_maps"},
     ["`control_folder`", "no_such_maps", "is not a folder"]),
    (CN, "empty control folder", {"control_folder": "empty_maps"},
     ["empty_maps", "4 training image(s) have no control map of the same name", "the `control_folder` input"]),
    (CN, "control maps of another shape", {"control_folder": "wide_maps"},
     ["wide_maps", "the control map is 256×64", "another aspect ratio"]),
    (CN, "resolution not a multiple of 8", {"resolution": 100}, ["`resolution`", "multiple of 8", "got 100"]),
    (DDPO, "missing checkpoint", *MISSING_CHECKPOINT),
    (DDPO, "no prompts", {"prompts": " \n \n"}, ["`prompts`", "at least one prompt"]),
    (DDPO, "samples not a multiple of the batch", {"samples_per_epoch": 3, "batch_size": 2},
     ["`samples_per_epoch`", "must be a multiple of", "got 3"]),
    (DDPO, "text encoder training", {"advanced": TINY_RUN + "[lora]\ntrain_text_encoder = true\n"},
     ["in `advanced`", "lora.train_text_encoder: DDPO trains the UNet only"]),
]


@pytest.mark.parametrize("class_type, case, changes, expected", CASES, ids=[f"{c[0][8:]}: {c[1]}" for c in CASES])
def test_a_bad_input_is_one_clear_execution_error_and_the_next_graph_runs(comfy, comfy_server, tiny_checkpoint,
                                                                          concept, class_type, case, changes,
                                                                          expected):
    result = comfy.run(method_graph(comfy, class_type, tiny_checkpoint, concept, changes), timeout=300)

    assert_clear_node_error(result, class_type, expected, case)
    assert not any(e.get("event") == "progress" for e in run_events(comfy_server)), f"{case}: training started"
    assert comfy.run(quick_graph(concept), timeout=120).status == "success", "the server did not go on"



REFUSED = [(TI, "0 vectors", {"num_vectors": 0}, "num_vectors"),
           (TI, "negative learning rate", {"learning_rate": -0.001}, "learning_rate"),
           (CN, "unknown preprocessor", {"preprocessor": "sketchy"}, "preprocessor"),
           (CN, "negative learning rate", {"learning_rate": -0.001}, "learning_rate"),
           (DDPO, "guidance below 1", {"guidance": 0.5}, "guidance"),
           (DDPO, "1 sampling step", {"sampling_steps": 1}, "sampling_steps"),
           (DDPO, "rank 0", {"rank": 0}, "rank"),
           (DDPO, "negative learning rate", {"learning_rate": -0.001}, "learning_rate")]


@pytest.mark.parametrize("class_type, case, changes, name", REFUSED, ids=[f"{c[0][8:]}: {c[1]}" for c in REFUSED])
def test_a_value_outside_its_range_or_choices_is_refused_before_running(comfy, tiny_checkpoint, concept, class_type,
                                                                        case, changes, name):
    with pytest.raises(PromptRejected) as refused:
        comfy.submit(method_graph(comfy, class_type, tiny_checkpoint, concept, changes))
    assert name in str(refused.value), case

def run_events(comfy_server) -> list[dict]:
    """The events of every run named never_trained."""
    events = []
    for record in (comfy_server.output_dir / "finetune").glob("*/run.json"):
        if json.loads(record.read_text())["name"] == "never_trained" and (record.parent / "events.jsonl").is_file():
            events += [json.loads(line) for line in (record.parent / "events.jsonl").read_text().splitlines()]
    return events
