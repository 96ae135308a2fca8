"""Example workflows 4-6 (textual inversion, ControlNet training then use, DDPO on JPEG compressibility) run in a real
ComfyUI on the tiny checkpoint. Only what a tiny CPU run needs is changed: the checkpoint, the image folder, step
counts, sizes, learning rates high enough for a few steps to show, and no sample images."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open

from tests.comfy.client import image_paths
from tests.comfy.training import SAMPLE_IMAGES, TINY_RUN, sample_images_in
from tests.comfy.workflow import to_api_graph

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
SIDE = 64


def example_graph(comfy, name: str) -> dict:
    path = EXAMPLES / name
    assert path.with_suffix(".jpg").is_file(), f"{name} has no thumbnail"
    return to_api_graph(json.loads(path.read_text(encoding="utf-8")), comfy.object_info())


def swap(graph: dict, class_type: str, **values) -> list[dict]:
    found = [node["inputs"] for node in graph.values() if node["class_type"] == class_type]
    assert found, f"the example has no {class_type}"
    for inputs in found:
        inputs.update(values)
    return found


def tiny(graph: dict, checkpoint: str) -> dict:
    swap(graph, "CheckpointLoaderSimple", ckpt_name=checkpoint)
    swap(graph, "KSampler", steps=2)
    swap(graph, "EmptyLatentImage", width=SIDE, height=SIDE)
    return graph


def saved(result, comfy_server) -> dict[str, np.ndarray]:
    """The Save Image pictures by file-name prefix (e.g. "ti_with_embedding")."""
    return {path.name.rsplit("_", 2)[0]: np.asarray(Image.open(path), dtype=np.int16)
            for path in image_paths(result, comfy_server.output_dir) if path.parent.name == "finetune"}


def run_record(comfy_server, name: str) -> dict:
    records = (json.loads(path.read_text()) for path in (comfy_server.output_dir / "finetune").glob("*/run.json"))
    [record] = [r for r in records if r["name"] == name]
    return record


def test_example_4_textual_inversion_embedding_changes_the_conditioning(comfy, comfy_server, comfyui_dir,
                                                                        tiny_checkpoint):
    name = f"example_4_{uuid.uuid4().hex[:8]}"
    graph = tiny(example_graph(comfy, "04_textual_inversion.json"), tiny_checkpoint)
    swap(graph, "FinetuneLoadTrainingImages", path=str(sample_images_in(comfy_server.input_dir, "example_concept")), resolution=SIDE)
    [train] = swap(graph, "FinetuneTrainTextualInversion", base_checkpoint=tiny_checkpoint, steps=2,
                   learning_rate=5e-2, name=name, sample_prompts="", advanced=TINY_RUN)
    embedding = comfyui_dir / "models" / "embeddings" / f"{name}.safetensors"
    try:
        result = comfy.run(graph, timeout=900)
        assert result.status == "success", result.error
        with safe_open(str(embedding), "pt") as f:
            assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (train["num_vectors"], 768)
        images = saved(result, comfy_server)
        assert sorted(images) == ["ti_with_embedding", "ti_without_embedding"]
        assert np.abs(images["ti_with_embedding"] - images["ti_without_embedding"]).mean() > 0.5
        assert f"embedding:{name} does not exist" not in comfy_server.log_text()
        assert run_record(comfy_server, name)["outputs"]["embedding"] == embedding.name
    finally:
        embedding.unlink(missing_ok=True)


def test_example_5_trained_controlnet_steers_generation(comfy, comfy_server, comfyui_dir, tiny_checkpoint):
    name = f"example_5_{uuid.uuid4().hex[:8]}"
    graph = tiny(example_graph(comfy, "05_controlnet_train_and_use.json"), tiny_checkpoint)
    swap(graph, "FinetuneLoadTrainingImages", path=str(sample_images_in(comfy_server.input_dir, "example_controlnet")),
         resolution=SIDE)
    swap(graph, "FinetuneTrainControlNet", base_checkpoint=tiny_checkpoint, steps=3, learning_rate=1e-2, name=name,
         advanced=TINY_RUN)
    photo = Image.open(SAMPLE_IMAGES / "robot_01.png").convert("RGB").resize((SIDE, SIDE))
    photo.save(comfy_server.input_dir / "example.png")
    controlnet = comfyui_dir / "models" / "controlnet" / f"{name}.safetensors"
    try:
        guided = comfy.run(graph, timeout=900)
        assert guided.status == "success", guided.error
        assert controlnet.is_file()
        assert run_record(comfy_server, name)["outputs"]["controlnet"] == controlnet.name
        swap(graph, "FinetuneControlNetCondition", strength=0.0)
        unguided = comfy.run(graph, timeout=300)
        assert unguided.status == "success", unguided.error
        difference = np.abs(saved(guided, comfy_server)["controlnet_trained"]
                            - saved(unguided, comfy_server)["controlnet_trained"]).mean()
        print(f"mean pixel change the trained ControlNet makes: {difference:.3f}")
        assert difference > 0.0
    finally:
        controlnet.unlink(missing_ok=True)


def test_example_6_ddpo_lora_changes_generation_and_reports_rewards(comfy, comfy_server, comfyui_dir,
                                                                    tiny_checkpoint):
    name = f"example_6_{uuid.uuid4().hex[:8]}"
    graph = tiny(example_graph(comfy, "06_ddpo_compressibility.json"), tiny_checkpoint)
    swap(graph, "FinetuneTrainDDPO", base_checkpoint=tiny_checkpoint, steps=2, samples_per_epoch=4,
         sampling_steps=2, guidance=1.0, resolution=SIDE, batch_size=2, learning_rate=3e-2, name=name,
         sample_prompts="", advanced=TINY_RUN)
    lora = comfyui_dir / "models" / "loras" / f"{name}.safetensors"
    try:
        result = comfy.run(graph, timeout=900)
        assert result.status == "success", result.error
        with safe_open(str(lora), "pt") as f:
            assert any(key.startswith("lora_unet_") for key in f.keys())
        record = run_record(comfy_server, name)
        assert record["outputs"]["lora"] == lora.name and record["method"] == "ddpo"
        events = [json.loads(line) for line in
                  (comfy_server.output_dir / "finetune" / record["id"] / "events.jsonl").read_text().splitlines()]
        rewards = [e["reward_mean"] for e in events if e["event"] == "progress"]
        print(f"DDPO mean reward (-kB of JPEG) per step: {rewards}")
        assert len(rewards) == 2 and all(r < 0 for r in rewards)
        previews = [image["filename"] for output in result.outputs.values() for image in output.get("images", [])]
        assert "reward.png" in previews
        images = saved(result, comfy_server)
        assert sorted(images) == ["ddpo_base", "ddpo_lora"]
        assert np.abs(images["ddpo_lora"] - images["ddpo_base"]).mean() > 0.5, "the DDPO LoRA changed nothing"
    finally:
        lora.unlink(missing_ok=True)
