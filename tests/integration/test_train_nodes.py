"""The training nodes on a real ComfyUI server: every bad input ends as one execution error that names the problem
and the fix (and the server goes on to run the next graph); a full fine-tune writes a checkpoint that ComfyUI's own
Load Checkpoint loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from PIL import Image

from tests.comfy.client import ComfyClient, image_paths
from tests.comfy.training import SAMPLE_IMAGES, TINY_RUN, sample_images_in



@pytest.fixture(scope="module")
def robots(comfy_server) -> str:
    """Four captioned sample images in a subfolder of the server's input folder; returns the subfolder's name."""
    folder = sample_images_in(comfy_server.input_dir, "robots")
    return folder.name


def load_images(folder: str = "(none)", path: str = "", **options) -> dict:
    inputs = dict(folder=folder, path=path, repeats=1, resolution=64, crop="center", flip=False, bucketing=False)
    return {"class_type": "FinetuneLoadTrainingImages", "inputs": {**inputs, **options}}


def train_node(kind: str, checkpoint: str, **options) -> dict:
    inputs = dict(base_checkpoint=checkpoint, dataset=["1", 0], trigger_word="sks", class_noun="robot", steps=2,
                  learning_rate=1e-4, resolution=0, batch_size=1, train_text_encoder=False, seed=3,
                  sample_prompts="", sample_every=0, advanced=TINY_RUN)
    if kind == "FinetuneTrainLoRA":
        inputs.update(method="LoRA", rank=4, alpha=4.0, name="bad_input_lora")
    else:
        inputs.update(method="Full fine-tune", ema=True, name="tiny_full")
    return {"class_type": kind, "inputs": {**inputs, **options}}


def dataset_preview_graph(folder: str) -> dict:
    """A quick graph that must run: a subfolder of the input folder, or an absolute path."""
    images = load_images(path=folder) if Path(folder).is_absolute() else load_images(folder=folder)
    return {"1": images, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}


@pytest.fixture(scope="module")
def broken_checkpoint(comfyui_dir):
    path = comfyui_dir / "models" / "checkpoints" / "finetune_test_broken.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    yield path.name
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("case, dataset, train, expected", [
    ("empty folder", {"path": "empty_folder"}, {}, ["no images found", "empty_folder", "`path`"]),
    ("missing folder", {"path": "no_such_folder"}, {}, ["no_such_folder", "does not exist", "`path`"]),
    ("missing checkpoint", {}, {"base_checkpoint": "no_such_model.safetensors"},
     ["`base_checkpoint`", "no_such_model.safetensors", "models/checkpoints"]),
    ("unknown advanced setting", {}, {"advanced": "[train]\nturbo = true"}, ["`advanced`", "turbo"]),
    ("unreadable checkpoint file", {}, {"base_checkpoint": "broken"},
     ["Training failed", "finetune_test_broken.safetensors", "not a readable .safetensors"]),
])
def test_a_bad_input_is_one_clear_execution_error_and_the_next_graph_runs(
        comfy, comfy_server, robots, tiny_checkpoint, broken_checkpoint, case, dataset, train, expected):
    (comfy_server.input_dir / "empty_folder").mkdir(exist_ok=True)
    if train.get("base_checkpoint") == "broken":
        train = {**train, "base_checkpoint": broken_checkpoint}
    graph = {"1": load_images(path=dataset.get("path", robots)),
             "2": train_node("FinetuneTrainLoRA", tiny_checkpoint, **train)}

    result = comfy.run(graph, timeout=300)

    assert result.status == "error", f"{case}: {result.status}"
    message = result.error.message
    assert result.error.node_type in ("FinetuneLoadTrainingImages", "FinetuneTrainLoRA")
    for needle in expected:
        assert needle in message, f"{case}: {needle!r} not in {message!r}"
    assert message.startswith("finetune.NodeError: ") and "Traceback" not in message and "\n" not in message.strip()
    assert comfy.run(dataset_preview_graph(robots), timeout=120).status == "success", "the server did not go on"


def test_the_dataset_node_reports_skipped_files_and_previews_what_it_kept(comfy, comfy_server, robots):
    folder = comfy_server.input_dir / "robots_with_junk"
    shutil.copytree(comfy_server.input_dir / robots, folder, dirs_exist_ok=True)
    (folder / "truncated.png").write_bytes((folder / "robot_01.png").read_bytes()[:200])
    Image.new("RGB", (16, 16)).save(folder / "tiny.png")
    graph = {"1": load_images(folder=folder.name),
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}

    result = comfy.run(graph, timeout=120)

    assert result.status == "success", result.error
    report = "".join(result.outputs["2"]["text"])
    assert "4 training image(s)" in report
    assert "truncated.png" in report and "tiny.png" in report and "skipped 2 file(s)" in report
    previews = result.outputs["3"]["images"]
    assert len(previews) == 4


def test_a_full_fine_tune_writes_a_checkpoint_that_load_checkpoint_loads_in_the_same_graph(
        comfy, comfy_server, comfyui_dir, robots, tiny_checkpoint):
    # The stock loader's ckpt_name is linked to the training node's output: the file does not exist when the graph
    # is validated, and ComfyUI loads it once the training has written it.
    graph = {**txt2img_graph(["train", 0]), "images": load_images(folder=robots),
             "train": train_node("FinetuneTrainCheckpoint", tiny_checkpoint, dataset=["images", 0])}
    assert not list((comfyui_dir / "models" / "checkpoints").glob("tiny_full*"))

    result = comfy.run(graph, timeout=900)

    assert result.status == "success", result.error
    [record] = [r for r in runs(comfy_server) if r["name"] == "tiny_full"]
    assert record["status"] == "succeeded" and record["method"] == "full" and record["step"] == 2
    name = record["outputs"]["checkpoint"]
    written = comfyui_dir / "models" / "checkpoints" / name
    try:
        assert written.is_file() and Path(record["outputs"]["path"]).resolve() == written.resolve()
        [image] = [p for p in image_paths(result, comfy_server.output_dir) if p.name.startswith("full_finetune")]
        assert Image.open(image).size == (64, 64)
    finally:
        written.unlink(missing_ok=True)


def test_a_trainer_that_dies_fails_the_node_with_the_reason_and_the_queue_goes_on(comfy, comfy_server, robots,
                                                                                  tiny_checkpoint):
    graph = {"1": load_images(folder=robots),
             "2": train_node("FinetuneTrainLoRA", tiny_checkpoint, steps=500, name="killed_lora")}
    with comfy.events() as events:
        prompt_id = comfy.submit(graph)
        started = events.wait_for(lambda e: e["type"] == "finetune.progress", timeout=600)["data"]
        [record] = [r for r in runs(comfy_server) if r["id"] == started["run_id"]]
        os.kill(record["pid"], signal.SIGKILL)  # as the system's out-of-memory killer would
        result = comfy.wait(prompt_id, timeout=120)

    assert result.status == "error"
    assert "killed by signal 9" in result.error.message and "`batch_size`" in result.error.message
    [record] = [r for r in runs(comfy_server) if r["id"] == started["run_id"]]
    assert record["status"] == "failed" and record["pid"] == 0 and "signal 9" in record["error"]
    assert comfy.run(dataset_preview_graph(robots), timeout=120).status == "success"


def test_a_trainer_that_stays_silent_too_long_is_stopped_and_the_queue_goes_on(start_extra_server, tiny_checkpoint):
    server = start_extra_server(extra_env={"COMFYUI_FINETUNE_IDLE_TIMEOUT_S": "1",
                                           "COMFYUI_FINETUNE_ALLOW_FOLDERS": str(SAMPLE_IMAGES)})
    client = ComfyClient(server.base_url)
    graph = {"1": load_images(path=str(SAMPLE_IMAGES)), "2": train_node("FinetuneTrainLoRA", tiny_checkpoint)}

    result = client.run(graph, timeout=300)

    assert result.status == "error"
    message = result.error.message
    assert "printed nothing for 1 s" in message and "COMFYUI_FINETUNE_IDLE_TIMEOUT_S" in message
    [record] = runs(server)
    assert record["status"] == "failed" and record["pid"] == 0
    assert client.run(dataset_preview_graph(str(SAMPLE_IMAGES)), timeout=120).status == "success"


def runs(comfy_server) -> list[dict]:
    root = comfy_server.output_dir / "finetune"
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/run.json"))]


def txt2img_graph(checkpoint: str | list) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks robot", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "full_finetune"}},
    }


def test_masks_from_the_graph_reach_the_trainer_beside_their_images(comfy, comfy_server, comfyui_dir, tiny_checkpoint):
    # Load Image's mask is 1 where the picture is transparent; inverted, it is 1 on the subject: what is learned.
    subject = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    subject.paste((220, 30, 30, 255), (16, 8, 48, 56))
    subject.save(comfy_server.input_dir / "masked_subject.png")
    graph = {"load": {"class_type": "LoadImage", "inputs": {"image": "masked_subject.png"}},
             "invert": {"class_type": "InvertMask", "inputs": {"mask": ["load", 1]}},
             "1": load_images(images=["load", 0], captions="a red robot", masks=["invert", 0]),
             "2": train_node("FinetuneTrainLoRA", tiny_checkpoint, name="masked_lora")}

    result = comfy.run(graph, timeout=900)

    assert result.status == "success", result.error
    [record] = [r for r in runs(comfy_server) if r["name"] == "masked_lora"]
    run_dir = comfy_server.output_dir / "finetune" / record["id"]
    try:
        assert json.loads((run_dir / "config.json").read_text())["data"]["masked_loss"] is True
        mask = Image.open(run_dir / "images" / "00000.mask.png")
        assert mask.mode == "L" and mask.tobytes() == subject.getchannel("A").tobytes()
    finally:
        (comfyui_dir / "models" / "loras" / record["outputs"]["lora"]).unlink(missing_ok=True)

    wrong = {**graph, "1": load_images(masks=["invert", 0])}
    failed = comfy.run(wrong, timeout=300)
    assert failed.status == "error" and "`masks` needs the `images` input" in failed.error.message
    small = {"load": graph["load"], "solid": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32,
                                                                                   "height": 32}},
             "1": load_images(images=["load", 0], masks=["solid", 0]),
             "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}
    failed = comfy.run(small, timeout=300)
    assert failed.status == "error"
    assert "`masks` is 1 mask(s) of 32×32 for 1 image(s) of 64×64" in failed.error.message
