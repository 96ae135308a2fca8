"""Train LoRA never overwrites a LoRA it did not make: when models/loras already holds files of the requested name, the
trained LoRA gets the next free one and those files stay byte for byte as they were."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import requests
from safetensors import safe_open

from tests.comfy.training import TINY_RUN, sample_images_in



def lora_graph(folder: Path, checkpoint: str, name: str) -> dict:
    images = {"folder": "(none)", "path": str(folder), "repeats": 1, "resolution": 64, "crop": "center",
              "flip": False, "bucketing": False}
    train = dict(base_checkpoint=checkpoint, dataset=["1", 0], method="LoRA", trigger_word="sks", class_noun="robot",
                 steps=2, learning_rate=1e-4, resolution=0, batch_size=1, train_text_encoder=False, seed=5, rank=4,
                 alpha=4.0, name=name, sample_prompts="", sample_every=0, advanced=TINY_RUN)
    return {"1": {"class_type": "FinetuneLoadTrainingImages", "inputs": images},
            "2": {"class_type": "FinetuneTrainLoRA", "inputs": train},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}


def test_a_lora_of_the_same_name_is_never_overwritten(comfy, comfy_server, comfyui_dir, tiny_checkpoint):
    folder = sample_images_in(comfy_server.input_dir, "unique_names", count=2)
    name = f"taken_{uuid.uuid4().hex[:8]}"
    loras = comfyui_dir / "models" / "loras"
    theirs = {loras / f"{name}.safetensors": b"someone's LoRA, not ours",
              loras / f"{name}_2.safetensors": b"another LoRA of theirs"}
    ours = loras / f"{name}_3.safetensors"
    for path, content in theirs.items():
        path.write_bytes(content)
    try:
        result = comfy.run(lora_graph(folder, tiny_checkpoint, name), timeout=600)

        assert result.status == "success", result.error
        assert "".join(result.outputs["3"]["text"]) == ours.name
        with safe_open(str(ours), "pt") as f:
            assert any(key.startswith("lora_unet_") for key in f.keys())
        library = [lora["name"] for lora in comfy.get("/finetune/loras").json()["loras"]]
        assert [n for n in library if n.startswith(name)] == [ours.name]
        refused = requests.delete(f"{comfy_server.base_url}/finetune/loras/{name}.safetensors", timeout=30)
        assert refused.status_code >= 400
        for path, content in theirs.items():
            assert path.read_bytes() == content, f"{path.name} was changed"
        records = [json.loads(p.read_text()) for p in (comfy_server.output_dir / "finetune").glob("*/run.json")]
        [record] = [r for r in records if r["name"] == name]
        assert record["outputs"]["lora"] == ours.name and Path(record["outputs"]["path"]) == ours
        assert sorted(p.name for p in loras.glob(f"{name}*")) == sorted([*(p.name for p in theirs), ours.name])
    finally:
        for path in [*theirs, ours]:
            path.unlink(missing_ok=True)
