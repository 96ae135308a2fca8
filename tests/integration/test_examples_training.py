"""The training examples, as saved by ComfyUI's frontend, run on a real server with the tiny checkpoint: example 1 is
cancelled mid-training, resumes from its checkpoint, finishes, and is then reused without training; example 2
(DreamBooth with prior preservation) and example 7 (LoKr with Prodigy) run end to end.

Only what a tiny CPU run needs is changed: the checkpoint, the image folder, step counts, the resolution, a learning
rate high enough for a few steps to change the images, and no sample images where none are checked."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.comfy.training import TINY_RUN, sample_images_in
from tests.comfy.workflow import to_api_graph

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
TINY_DREAMBOOTH = TINY_RUN + "[dreambooth]\nnum_class_images = 2\nclass_generation_steps = 2\n"


@pytest.fixture(scope="module")
def photos(comfy_server) -> Path:
    """Four uncaptioned sample images in the server's input folder (the caption node captions them)."""
    return sample_images_in(comfy_server.input_dir, "example_photos", captions=False)


def example_graph(comfy, name: str) -> dict:
    saved = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    assert (EXAMPLES / name).with_suffix(".jpg").is_file(), f"{name} has no thumbnail"
    return to_api_graph(saved, comfy.object_info())


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    found = [node["inputs"] for node in graph.values() if node["class_type"] == class_type]
    assert found, f"the example has no {class_type}"
    return found


def shrink(graph: dict, checkpoint: str, photos: Path, *, run_name: str, steps: int, advanced: str,
           samples: bool) -> dict:
    for loader in nodes_of(graph, "CheckpointLoaderSimple"):
        loader["ckpt_name"] = checkpoint
    for dataset in nodes_of(graph, "FinetuneLoadTrainingImages"):
        dataset.update(path=str(photos), resolution=64)
    for train in nodes_of(graph, "FinetuneTrainLoRA"):
        train.update(base_checkpoint=checkpoint, steps=steps, learning_rate=5e-3, sample_every=0, name=run_name,
                     advanced=advanced)
        if not samples:
            train["sample_prompts"] = ""
    for sampler in nodes_of(graph, "KSampler"):
        sampler["steps"] = 2
    for latent in nodes_of(graph, "EmptyLatentImage"):
        latent.update(width=64, height=64, batch_size=1)
    for caption in [n["inputs"] for n in graph.values() if n["class_type"] == "FinetuneBLIPCaption"]:
        caption["model"] = "tiny-blip"
    return graph


def unique_name(prefix: str) -> str:
    """A run name no earlier session used, so that no finished run of the same content is reused."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def run_records(comfy_server, name: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((comfy_server.output_dir / "finetune").glob("*/run.json"))]
    return [record for record in records if record["name"] == name]


def run_progress(events, run_id: str) -> list[int]:
    return [e["step"] for e in events.of_type("finetune.progress") if e["run_id"] == run_id]


def saved_images(result, graph: dict, comfy_server) -> list[np.ndarray]:
    """The pictures the graph's Save Image nodes wrote (not the Train node's chart and samples)."""
    savers = {node_id for node_id, node in graph.items() if node["class_type"] == "SaveImage"}
    paths = [comfy_server.output_dir / image.get("subfolder", "") / image["filename"]
             for node_id, output in result.outputs.items() if node_id in savers for image in output.get("images", [])]
    return [np.asarray(Image.open(path), dtype=np.int16) for path in paths]


def test_example_1_cancel_resume_finish_then_reuse(comfy, comfy_server, comfyui_dir, tiny_checkpoint, photos):
    run_name = unique_name("example_1")
    graph = shrink(example_graph(comfy, "01_photos_to_lora.json"), tiny_checkpoint, photos, run_name=run_name,
                   steps=6, advanced=TINY_RUN, samples=False)

    # Cancel once training has made some progress: the run keeps a checkpoint.
    with comfy.events() as events:
        prompt_id = comfy.submit(graph)
        events.wait_for(lambda e: e["type"] == "finetune.progress" and e["data"]["step"] >= 2, timeout=600)
        comfy.interrupt()
        cancelled = comfy.wait(prompt_id, timeout=300)
    assert cancelled.status == "interrupted", cancelled.error
    [record] = run_records(comfy_server, run_name)
    run_dir = comfy_server.output_dir / "finetune" / record["id"]
    assert record["status"] == "cancelled" and record["step"] >= 2
    assert sorted((run_dir / "checkpoints").glob("step_*")), "no checkpoint was kept"
    stopped_at = record["step"]

    # Queued again, it resumes from that checkpoint and finishes.
    with comfy.events() as events:
        finished = comfy.run(graph, timeout=900)
    assert finished.status == "success", finished.error
    steps = run_progress(events, record["id"])
    assert steps[0] == stopped_at + 1 and steps[-1] == 6, steps
    log = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "status" and "resumed" in e["message"] for e in log)
    [record] = run_records(comfy_server, run_name)
    assert record["status"] == "succeeded" and record["step"] == 6
    lora = comfyui_dir / "models" / "loras" / record["outputs"]["lora"]
    try:
        assert lora.is_file() and Path(record["outputs"]["path"]).resolve() == lora.resolve()
        images = saved_images(finished, graph, comfy_server)
        assert len(images) == 2, "expected one image with the LoRA and one without"
        with_lora, without_lora = images
        assert np.abs(with_lora - without_lora).mean() > 0.5, "the LoRA did not change the image"
        assert comfy.run(stock_lora_graph(tiny_checkpoint, lora.name), timeout=300).status == "success"

        # Everything cleared from ComfyUI's cache: the run is found by its content and not trained again.
        comfy.free()
        train_log = (run_dir / "train.log").read_text()
        started = time.monotonic()
        with comfy.events() as events:
            again = comfy.run(graph, timeout=300)
        assert again.status == "success", again.error
        assert run_progress(events, record["id"]) == [] and (run_dir / "train.log").read_text() == train_log
        assert time.monotonic() - started < 120
        assert [r["outputs"]["lora"] for r in run_records(comfy_server, run_name)] == [lora.name]
    finally:
        lora.unlink(missing_ok=True)


def test_example_2_dreambooth_with_prior_preservation_runs(comfy, comfy_server, comfyui_dir, tiny_checkpoint, photos):
    run_name = unique_name("example_2")
    graph = shrink(example_graph(comfy, "02_dreambooth_prior.json"), tiny_checkpoint, photos, run_name=run_name,
                   steps=2, advanced=TINY_DREAMBOOTH, samples=True)
    [train] = nodes_of(graph, "FinetuneTrainLoRA")
    assert train["method"].startswith("DreamBooth") and train["class_noun"] == "person"

    result = comfy.run(graph, timeout=900)

    assert result.status == "success", result.error
    [record] = run_records(comfy_server, run_name)
    lora = comfyui_dir / "models" / "loras" / record["outputs"]["lora"]
    try:
        assert record["status"] == "succeeded" and record["method"] == "lora + DreamBooth" and lora.is_file()
        log = (comfy_server.output_dir / "finetune" / record["id"] / "events.jsonl").read_text()
        assert "generating class images 2/2" in log
        assert len(record["outputs"]["samples"]) == 1
        assert len(saved_images(result, graph, comfy_server)) == 1
    finally:
        lora.unlink(missing_ok=True)


@pytest.mark.slow  # ~50 s; the newest-ComfyUI leg runs example 1, whose nodes are the same
def test_example_7_lokr_with_prodigy_runs_and_loads_in_comfyui(comfy, comfy_server, comfyui_dir, tiny_checkpoint,
                                                               photos):
    from safetensors import safe_open

    run_name = unique_name("example_7")
    graph = shrink(example_graph(comfy, "07_lokr_prodigy.json"), tiny_checkpoint, photos, run_name=run_name,
                   steps=2, advanced=TINY_RUN + "[lora]\nlokr_factor = 8\n", samples=False)
    [train] = nodes_of(graph, "FinetuneTrainLoRA")
    assert (train["algorithm"], train["optimizer"]) == ("lokr", "prodigy")
    train["learning_rate"] = 0.0  # the example's own: Prodigy's default

    result = comfy.run(graph, timeout=900)

    assert result.status == "success", result.error
    [record] = run_records(comfy_server, run_name)
    lora = comfyui_dir / "models" / "loras" / record["outputs"]["lora"]
    try:
        log = [json.loads(line) for line in
               (comfy_server.output_dir / "finetune" / record["id"] / "events.jsonl").read_text().splitlines()]
        plan = next(e for e in log if e["event"] == "plan")
        assert (plan["optimizer"], plan["learning_rate"], plan["learning_rate_from"]) == ("prodigy", 1.0,
                                                                                         "prodigy's default")
        # The example's own Apply LoRA applied it; that ComfyUI's loader uses every LoKr key and computes what we
        # trained is proved in tests/integration/test_comfy_lora.py (a stock Load LoRA graph here proved nothing more).
        with safe_open(str(lora), "pt") as f:
            assert f.metadata()["ss_network_module"] == "lycoris.kohya"
            assert any(".lokr_w1" in key for key in f.keys())
    finally:
        lora.unlink(missing_ok=True)


def stock_lora_graph(checkpoint: str, lora_name: str) -> dict:
    """ComfyUI's own Load LoRA on the file, in a small txt2img graph."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks robot", "clip": ["2", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
