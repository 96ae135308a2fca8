"""What the loop writes besides the final LoRA: a full fine-tune's EMA weights (exported and sampled), intermediate
exports (`output.save_every`), and the peft format (`lora.format = "peft"`)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.checkpointing import latest_checkpoint
from trainers.loop import train

from train_helpers import (assert_sampled_and_exported_the_ema_weights, make_images, read_events,
                           record_sampled_and_exported_unet, tiny_config)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("outputs") / "images", count=3)


def test_a_full_finetune_exports_and_samples_its_ema_weights(tmp_path, images, monkeypatch):
    seen = record_sampled_and_exported_unet(monkeypatch)
    cfg = tiny_config(tmp_path, images, steps=3, train={"method": "full", "learning_rate": 1e-3},
                      full={"ema": True, "ema_decay": 0.5}, output={"sample_prompts": ["a red disc"], "sample_steps": 1})
    result = train(cfg)
    assert_sampled_and_exported_the_ema_weights(result.run_dir, seen)
    with safe_open(result.outputs["model"], "pt") as f:
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())


def test_save_every_exports_intermediate_results_and_the_final_one(tmp_path, images):
    result = train(tiny_config(tmp_path, images, steps=4, output={"save_every": 2}))
    saved = [(e["step"], e["kind"], e["path"]) for e in read_events(result.run_dir) if e["event"] == "saved"]
    assert [(step, kind) for step, kind, _ in saved] == [(2, "lora-intermediate"), (4, "lora")]
    intermediate = result.run_dir / "intermediate" / "tiny_step000002.safetensors"
    assert saved[0][2] == str(intermediate)
    with safe_open(intermediate, "pt") as early, safe_open(result.outputs["model"], "pt") as final:
        assert early.metadata()["ss_steps"] == "2" and final.metadata()["ss_steps"] == "4"
        assert early.keys() == final.keys()
        key = next(k for k in early.keys() if k.endswith("lora_up.weight"))
        assert not torch.equal(early.get_tensor(key), final.get_tensor(key)), "the intermediate file is the final one"


def test_peft_format_from_the_loop_loads_into_a_diffusers_pipeline(tmp_path, images):
    from tiny_models import tiny_pipeline_dir

    result = train(tiny_config(tmp_path, images, steps=2, lora={"format": "peft"}))
    folder = result.outputs["model"]
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir("sd1"))
    pipeline.load_lora_weights(folder)
    trained = load_file(str(latest_checkpoint(result.run_dir) / "trainable.safetensors"))
    loaded = get_peft_model_state_dict(pipeline.unet, adapter_name=pipeline.get_active_adapters()[0])
    assert loaded.keys() == {k[len("unet."):] for k in trained}
    for key, value in loaded.items():
        torch.testing.assert_close(value, trained[f"unet.{key}"], rtol=0, atol=0, msg=key)
    assert any(value.abs().max() > 0 for key, value in loaded.items() if "lora_B" in key), "nothing was trained"
