"""DDPO Reference Reward: images from the graph become Train DDPO's reward, on a real server and the tiny checkpoint."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from PIL import Image, ImageDraw

from tests.comfy.training import TINY_RUN

SIDE = 64


def with_defaults(comfy, class_type: str, **inputs) -> dict:
    """A node of `class_type` with every required input at its default, then `inputs`."""
    required = comfy.object_info(class_type)["input"]["required"]
    values = {name: spec[1]["default"] for name, spec in required.items()
              if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
    return {"class_type": class_type, "inputs": {**values, **inputs}}


def reference_graph(comfy, checkpoint: str, image: str, name: str, clip_model: str = "(none)") -> dict:
    return {
        "reference": {"class_type": "LoadImage", "inputs": {"image": image}},
        "reward": {"class_type": "FinetuneDDPOReferenceReward",
                   "inputs": {"images": ["reference", 0], "clip_model": clip_model}},
        "train": with_defaults(comfy, "FinetuneTrainDDPO", base_checkpoint=checkpoint, prompts="a landscape",
                               steps=2, samples_per_epoch=4, sampling_steps=2, guidance=1.0, resolution=SIDE,
                               batch_size=2, learning_rate=3e-2, name=name, sample_prompts="", advanced=TINY_RUN,
                               reward_model=["reward", 0]),
    }


def test_images_in_the_graph_are_the_ddpo_reward(comfy, comfy_server, comfyui_dir, tiny_checkpoint):
    image = Image.new("RGB", (96, SIDE), (40, 90, 220))
    ImageDraw.Draw(image).rectangle((0, 40, 96, SIDE), fill=(30, 160, 40))
    image.save(comfy_server.input_dir / "reference_landscape.png")
    name = f"reference_reward_{uuid.uuid4().hex[:8]}"
    lora = comfyui_dir / "models" / "loras" / f"{name}.safetensors"
    try:
        result = comfy.run(reference_graph(comfy, tiny_checkpoint, "reference_landscape.png", name), timeout=900)
        assert result.status == "success", result.error
        assert lora.is_file()
        [record] = [json.loads(p.read_text()) for p in (comfy_server.output_dir / "finetune").glob("*/run.json")
                    if json.loads(p.read_text())["name"] == name]
        run_dir = comfy_server.output_dir / "finetune" / record["id"]
        ddpo = json.loads((run_dir / "config.json").read_text())["ddpo"]
        assert ddpo["reward"] == "reference_similarity"
        assert [p.name for p in sorted(Path(ddpo["reference_folder"]).iterdir())] == ["reference_000.png"]
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        rewards = [e["reward_mean"] for e in events if e["event"] == "progress"]
        print(f"DDPO mean reference similarity per step: {rewards}")
        assert len(rewards) == 2 and all(0 <= r <= 1 for r in rewards)
    finally:
        lora.unlink(missing_ok=True)


def test_reference_images_too_small_or_a_missing_clip_model_are_clear_errors(comfy, comfy_server, tiny_checkpoint):
    Image.new("RGB", (32, 32), "white").save(comfy_server.input_dir / "reference_tiny.png")
    result = comfy.run(reference_graph(comfy, tiny_checkpoint, "reference_tiny.png", "never_trained"), timeout=300)
    assert result.status == "error" and "at least 64 px" in result.error.message, result.error
    assert "Traceback" not in result.error.message

    Image.new("RGB", (SIDE, SIDE), "white").save(comfy_server.input_dir / "reference_plain.png")
    result = comfy.run(reference_graph(comfy, tiny_checkpoint, "reference_plain.png", "never_trained",
                                       clip_model="no-such-clip"), timeout=300)
    assert result.status == "error" and "clip_model" in result.error.message and "reward_models" in \
        result.error.message, result.error
