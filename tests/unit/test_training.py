"""The training loop on a tiny SD1-shaped model: export, resume exactness, stop, NaN, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors import safe_open

from trainers.errors import ConfigError, DataError, ModelError, NonFiniteLoss
from trainers.loop import train

from train_helpers import make_images, read_events, stop_then_resume, tiny_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "images")


def test_lora_run_exports_kohya_file_with_config_and_events(tmp_path, images):
    cfg = tiny_config(tmp_path, images, steps=4)
    result = train(cfg)
    assert result.status == "succeeded" and result.steps_done == 4
    lora = result.outputs["model"]
    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_steps"] == "4"
    assert (result.run_dir / "config.json").is_file()
    events = read_events(result.run_dir)
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) for e in progress)
    assert events[-1]["event"] == "done" and events[-1]["status"] == "succeeded"


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_loss_curve(tmp_path, images):
    steps = 8
    straight = train(tiny_config(tmp_path / "a", images, steps=steps, data={"flip": True, "caption_dropout": 0.2}))
    reference = [e["loss"] for e in read_events(straight.run_dir) if e["event"] == "progress"]

    cfg = tiny_config(tmp_path / "b", images, steps=steps, data={"flip": True, "caption_dropout": 0.2})
    _, second = stop_then_resume(cfg, at_step=3)
    assert second.status == "succeeded"
    events = read_events(second.run_dir)
    resumed = [e["loss"] for e in events if e["event"] == "progress"]
    assert [e["step"] for e in events if e["event"] == "progress"][3] == 4, "the resumed run restarted"
    assert len(resumed) == steps
    for step, (want, got) in enumerate(zip(reference, resumed), start=1):
        assert abs(want - got) <= 1e-5, f"step {step}: {want} vs {got}"


def test_a_second_run_with_the_same_name_is_refused(tmp_path, images):
    cfg = tiny_config(tmp_path, images, steps=1)
    train(cfg)
    with pytest.raises(Exception, match="already exists"):
        train(cfg)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, images):
    cfg = tiny_config(tmp_path, images, steps=30, train={"learning_rate": 1e12, "max_grad_norm": 0.0},
                      output={"checkpoint_every": 1, "keep_checkpoints": 1})
    with pytest.raises(NonFiniteLoss, match="learning_rate") as info:
        train(cfg)
    assert "last good checkpoint" in str(info.value)
    checkpoints = sorted((tmp_path / "runs" / "tiny" / "checkpoints").glob("step_*"))
    assert checkpoints, "no checkpoint was kept"


@pytest.mark.parametrize("section, values, error, field", [
    ("lora", {"rank": 0}, ConfigError, "lora.rank"),
    ("train", {"learning_rate": -1.0}, ConfigError, "train.learning_rate"),
    ("data", {"resolution": 65}, ConfigError, "data.resolution"),
])
def test_bad_config_values_name_the_field(tmp_path, images, section, values, error, field):
    with pytest.raises(error, match=field.replace(".", r"\.")):
        train(tiny_config(tmp_path, images, **{section: values}))


def test_missing_checkpoint_and_empty_folder_fail_before_training(tmp_path, images):
    cfg = tiny_config(tmp_path, images)
    missing = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ModelError, match="nope.safetensors"):
        train(missing)
    (tmp_path / "empty").mkdir()
    empty = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, folder=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="empty"):
        train(empty)


def test_full_finetune_runs_and_writes_a_single_file_checkpoint(tmp_path, images):
    cfg = tiny_config(tmp_path, images, steps=2, train={"method": "full", "learning_rate": 1e-4})
    result = train(cfg)
    with safe_open(result.outputs["model"], "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)


def test_two_runs_in_one_process_may_use_different_precisions(tmp_path, images):
    first = train(tiny_config(tmp_path / "a", images, steps=1, train={"mixed_precision": "no"}))
    second = train(tiny_config(tmp_path / "b", images, steps=1, train={"mixed_precision": "bf16"}))
    assert first.status == second.status == "succeeded"


def test_compiled_unet_trains_the_same_and_exports_the_same_keys(tmp_path, images, monkeypatch):
    # Dynamo traces the LoRA'd UNet's training forward as `train.compile` asks; the eager backend keeps this fast on
    # a CPU (the GPU tests use the real compiler and CUDA graphs). Names in checkpoints and the export must not
    # change, and sample images keep using the eager UNet.
    real_compile, compiled = torch.compile, []

    def eager_compile(model, **options):
        compiled.append((type(model).__name__, options["mode"]))
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    samples = {"sample_prompts": ["sks"], "sample_steps": 2}
    plain = train(tiny_config(tmp_path / "a", images, steps=3, output=samples))
    compiled_run = train(tiny_config(tmp_path / "b", images, steps=3, output=samples, train={"compile": True}))
    losses = [[e["loss"] for e in read_events(r.run_dir) if e["event"] == "progress"] for r in (plain, compiled_run)]
    assert compiled == [("UNet2DConditionModel", "reduce-overhead")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert compiled_run.outputs["sample_0"]
    with safe_open(plain.outputs["model"], "pt") as a, safe_open(compiled_run.outputs["model"], "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
