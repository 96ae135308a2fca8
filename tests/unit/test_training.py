"""The training loop on a tiny SD1-shaped model: export, resume exactness, stop, NaN, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors import safe_open

from trainers.errors import ConfigError, DataError, ModelError, NonFiniteLoss
from trainers.loop import train

from train_helpers import read_events, stop_then_resume, tiny_config


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


def test_compiled_blocks_are_the_transformer_blocks_and_only_training_compiles_graphs(tmp_path, images, monkeypatch):
    # Regional compilation through a recording backend: which modules are compiled, with which mode, and whether
    # any graph is made outside the training step (sample images and held-out loss run without gradients).
    real_compile, modes, graphs_with_grad = torch.compile, [], []

    def recording_compile(fn, **options):
        modes.append((type(fn.__self__).__name__, options["mode"]))

        def backend(graph, example_inputs):
            graphs_with_grad.append(torch.is_grad_enabled())
            return graph.forward

        return real_compile(fn, backend=backend)

    monkeypatch.setattr(torch, "compile", recording_compile)
    data = {"validation_fraction": 0.25}
    output = {"sample_prompts": ["sks"], "sample_steps": 2, "sample_every": 2, "validation_every": 2}
    plain = train(tiny_config(tmp_path / "a", images, steps=4, data=data, output=output))
    compiled_run = train(tiny_config(tmp_path / "b", images, steps=4, data=data, output=output, train={
        "compile": True, "compile_scope": "blocks", "compile_mode": "default"}))
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in plain_unet_modules())
    assert modes == [("BasicTransformerBlock", "default")] * blocks and blocks > 0
    assert graphs_with_grad and all(graphs_with_grad), graphs_with_grad
    events = [read_events(r.run_dir) for r in (plain, compiled_run)]
    for kind in ("progress", "validation"):
        got = [[e["loss"] for e in run if e["event"] == kind] for run in events]
        assert got[0] and got[0] == pytest.approx(got[1], rel=1e-5), kind
    assert sum(e["event"] == "sample" for e in events[1]) == 2
    with safe_open(plain.outputs["model"], "pt") as a, safe_open(compiled_run.outputs["model"], "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())


def test_compiled_blocks_need_a_diffusers_that_names_the_repeated_blocks(tmp_path, images, monkeypatch):
    from diffusers import UNet2DConditionModel

    monkeypatch.setattr(UNet2DConditionModel, "_repeated_blocks", [])
    with pytest.raises(ConfigError, match="upgrade diffusers, or use compile_scope unet") as error:
        train(tiny_config(tmp_path, images, steps=1, train={"compile": True, "compile_scope": "blocks"}))
    assert error.value.where == "train.compile_scope"


def plain_unet_modules():
    from diffusers import UNet2DConditionModel
    from tiny_models import tiny_pipeline_dir

    return UNet2DConditionModel.from_pretrained(str(tiny_pipeline_dir("sd1")), subfolder="unet").modules()


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_with_the_real_compiler(tmp_path, images):
    # The real compiler (C++ kernels on a CPU) on LoRA'd transformer blocks, with gradient checkpointing around them
    # and gradient accumulation.
    settings = {"gradient_checkpointing": True, "gradient_accumulation": 2}
    eager = train(tiny_config(tmp_path / "a", images, steps=3, train=settings))
    compiled = train(tiny_config(tmp_path / "b", images, steps=3, train={
        **settings, "compile": True, "compile_scope": "blocks", "compile_mode": "default"}))
    losses = [[e["loss"] for e in read_events(r.run_dir) if e["event"] == "progress"] for r in (eager, compiled)]
    assert len(losses[1]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-5)
