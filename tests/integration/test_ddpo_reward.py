"""DDPO Reward on a real ComfyUI server: a model-based reward (a tiny random CLIP with an aesthetic predictor, put
into models/reward_models as a user would) feeds Train DDPO, which trains on it to the end; missing or unreadable
reward files end as one clear execution error that says where the file goes."""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from tests.comfy.client import assert_clear_node_error
from tests.comfy.training import TINY_RUN

SIDE = 64
PREFIX = "finetune_test_"
CLIP, HEAD, NOT_A_MODEL, NOT_A_HEAD = (f"{PREFIX}{name}" for name in ("clip", "aesthetic.pth", "broken",
                                                                      "junk.pth"))


@pytest.fixture(scope="module")
def reward_models(comfyui_dir) -> Path:
    """models/reward_models with a tiny CLIP folder, its aesthetic predictor, a folder that is not a model and a file
    that is not a predictor; all removed afterwards."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from trainers.models.families import SD1

    folder = comfyui_dir / "models" / "reward_models"
    folder.mkdir(parents=True, exist_ok=True)
    made = [folder / name for name in (CLIP, HEAD, NOT_A_MODEL, NOT_A_HEAD)]
    torch.manual_seed(0)
    width = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1}
    CLIPModel(CLIPConfig(text_config=width, vision_config={**width, "image_size": 32, "patch_size": 8},
                         projection_dim=8)).save_pretrained(folder / CLIP)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  SD1.load_tokenizers()[0]).save_pretrained(folder / CLIP)
    head = [torch.nn.Linear(a, b) for a, b in ((8, 16), (16, 8), (8, 4), (4, 2), (2, 1))]
    torch.save({f"layers.{i}.{k}": v for i, layer in zip((0, 2, 4, 6, 7), head) for k, v in layer.state_dict().items()},
               folder / HEAD)
    (folder / NOT_A_MODEL).mkdir(exist_ok=True)
    (folder / NOT_A_MODEL / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (folder / NOT_A_HEAD).write_bytes(b"not a checkpoint")
    yield folder
    for path in made:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def reward_graph(comfy, checkpoint: str, name: str, **reward) -> dict:
    required = comfy.object_info("FinetuneTrainDDPO")["input"]["required"]
    defaults = {key: spec[1]["default"] for key, spec in required.items()
                if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
    train = dict(defaults, base_checkpoint=checkpoint, prompts="a red robot\na blue robot", steps=2,
                 samples_per_epoch=4, sampling_steps=2, guidance=1.0, resolution=SIDE, batch_size=2,
                 learning_rate=3e-2, name=name, sample_prompts="", advanced=TINY_RUN, reward_model=["reward", 0])
    choice = {"reward": "aesthetic", "model": CLIP, "aesthetic_predictor": HEAD, **reward}
    return {"reward": {"class_type": "FinetuneDDPOReward", "inputs": choice},
            "train": {"class_type": "FinetuneTrainDDPO", "inputs": train}}


def run_of(comfy_server, name: str) -> tuple[dict, Path]:
    root = comfy_server.output_dir / "finetune"
    [record] = [r for r in (json.loads(p.read_text()) for p in root.glob("*/run.json")) if r["name"] == name]
    return record, root / record["id"]


def test_a_model_reward_from_ddpo_reward_trains_ddpo_to_the_end(comfy, comfy_server, comfyui_dir, tiny_checkpoint,
                                                                reward_models):
    reward = "aesthetic"
    name = f"model_reward_{uuid.uuid4().hex[:8]}"
    lora = comfyui_dir / "models" / "loras" / f"{name}.safetensors"
    try:
        result = comfy.run(reward_graph(comfy, tiny_checkpoint, name, reward=reward), timeout=900)
        assert result.status == "success", result.error
        assert lora.is_file()
        record, run_dir = run_of(comfy_server, name)
        assert record["status"] == "succeeded" and record["outputs"]["lora"] == lora.name
        ddpo = json.loads((run_dir / "config.json").read_text())["ddpo"]
        assert ddpo["reward"] == reward and Path(ddpo["reward_model"]) == reward_models / CLIP
        assert ddpo["aesthetic_head"] == (str(reward_models / HEAD) if reward == "aesthetic" else "")
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        rewards = [e["reward_mean"] for e in events if e["event"] == "progress"]
        print(f"DDPO mean {reward} reward per step: {rewards}")
        assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    finally:
        lora.unlink(missing_ok=True)


@pytest.mark.parametrize("case, reward, node, expected", [
    ("no model installed", {"model": "(none)"}, "FinetuneDDPOReward",
     ["`model`", "the aesthetic reward needs a model and none is installed", "models/reward_models"]),
    ("a model folder that is not there", {"reward": "clip_score", "model": "no_such_clip"}, "FinetuneDDPOReward",
     ["`model`", "no model folder 'no_such_clip'", "models/reward_models/no_such_clip"]),
    ("no aesthetic predictor", {"aesthetic_predictor": "(none)"}, "FinetuneDDPOReward",
     ["`aesthetic_predictor`", "sac+logos+ava1-l14-linearMSE.pth", "models/reward_models"]),
    ("a folder that is not a model", {"reward": "clip_score", "model": NOT_A_MODEL}, "FinetuneTrainDDPO",
     ["Training failed: `reward_model`", NOT_A_MODEL, "cannot load the reward model"]),
    ("a file that is not a predictor", {"aesthetic_predictor": NOT_A_HEAD}, "FinetuneTrainDDPO",
     ["Training failed: `reward_model`", NOT_A_HEAD, "cannot read the aesthetic predictor"]),
])
def test_a_missing_or_unreadable_reward_model_is_one_clear_error(comfy, comfy_server, tiny_checkpoint, reward_models,
                                                                 case, reward, node, expected):
    result = comfy.run(reward_graph(comfy, tiny_checkpoint, "never_rewarded", **reward), timeout=300)

    assert_clear_node_error(result, node, expected, case)
    quick = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    assert comfy.run(quick, timeout=120).status == "success", "the server did not go on"
