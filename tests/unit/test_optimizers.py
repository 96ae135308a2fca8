"""Every optimizer trains a tiny LoRA, saves its state and resumes exactly; schedule-free samples, validates and
exports with its averaged weights; the learning-rate rule (0 = the optimizer's default) and its plan line."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from safetensors.torch import load_file

import trainers.loop
from trainers.errors import ConfigError
from trainers.loop import train
from trainers.plan import make_plan

from train_helpers import make_images, read_events, stop_then_resume, tiny_config

STEPS = 20
RESUME_STEPS = 4
"""The resume tests train this many steps, stopped halfway: the straight runs' first steps are their reference."""
ADAPTIVE = ("prodigy", "schedulefree_adamw", "adafactor")
SHARE_OF_ADAMW_DROP = {"prodigy": 1.0, "schedulefree_adamw": 0.4, "adafactor": 0.1}
"""How much of AdamW's held-out loss drop each must reach in STEPS steps, every one at its own default learning rate
(no tuning: AdamW and schedule-free at LoRA's 1e-4, prodigy at 1.0, adafactor at 1e-2). Measured on this tiny model:
prodigy ~3.4x AdamW's drop; schedule-free ~0.57x (it evaluates the average of its iterates, which trails them early
on); adafactor ~0.15x (its step is relative to each weight's size, and a LoRA's up-weights start at zero: it is meant
for full fine-tunes)."""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizers")
    return make_images(root / "images"), make_images(root / "heldout", count=3, seed=5)


def config(tmp_path, images, optimizer: str, *, steps: int = STEPS, learning_rate: float = 0.0, **sections):
    train_images, heldout = images
    settings = {"optimizer": optimizer, "learning_rate": learning_rate, "warmup_steps": 0,
                **sections.pop("train", {})}
    return tiny_config(tmp_path, train_images, steps=steps, train=settings,
                       data={"validation_folder": str(heldout)}, **sections)


def final_validation(run_dir) -> float:
    return [e["loss"] for e in read_events(run_dir) if e["event"] == "validation"][-1]


def progress_losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["event"] == "progress"]


def saved_at(run_dir, step: int) -> str:
    [path] = [e["path"] for e in read_events(run_dir) if e["event"] == "saved" and e["step"] == step]
    return path


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, images):
    """Each optimizer's uninterrupted run (with its LoRA also saved after RESUME_STEPS steps), and the base model's
    held-out loss (a LoRA starts as the identity, so one step at a vanishing learning rate measures it)."""
    root = tmp_path_factory.mktemp("straight")
    base = train(config(root / "base", images, "adamw", steps=1, learning_rate=1e-30))
    runs = {name: train(config(root / name, images, name, output={"save_every": RESUME_STEPS}))
            for name in ("adamw", *ADAPTIVE)}
    return final_validation(base.run_dir), runs


@pytest.mark.parametrize("name", ADAPTIVE)
def test_each_optimizer_lowers_the_heldout_loss_against_adamw(straight_runs, name):
    base_loss, runs = straight_runs
    adamw_drop = base_loss - final_validation(runs["adamw"].run_dir)
    drop = base_loss - final_validation(runs[name].run_dir)
    assert adamw_drop > 0
    assert drop > 0, f"{name} did not lower the held-out loss ({base_loss} -> {base_loss - drop})"
    assert drop >= SHARE_OF_ADAMW_DROP[name] * adamw_drop, f"{name}: {drop} against AdamW's {adamw_drop}"


@pytest.mark.parametrize("name", ADAPTIVE)
def test_each_optimizer_resumes_exactly(tmp_path, images, straight_runs, name):
    """A run of RESUME_STEPS steps stopped halfway and resumed is, bit for bit, the straight run's first RESUME_STEPS
    steps (a constant learning rate: the steps after do not change the first ones): the same losses after the
    restart (the weights restored) and the same LoRA (the last steps taken with the restored optimizer state)."""
    _, runs = straight_runs
    straight = runs[name].run_dir
    _, resumed = stop_then_resume(config(tmp_path, images, name, steps=RESUME_STEPS), at_step=RESUME_STEPS // 2)
    assert progress_losses(resumed.run_dir) == progress_losses(straight)[:RESUME_STEPS]
    want = load_file(saved_at(straight, RESUME_STEPS))
    got = load_file(str(resumed.outputs["model"]))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_schedule_free_validates_and_exports_its_averaged_weights(tmp_path, images, monkeypatch):
    """Validation every step switches to the averaged weights and back: training goes on bit for bit as without it,
    and without the switch both the held-out loss and the exported LoRA differ."""
    quiet = train(config(tmp_path / "quiet", images, "schedulefree_adamw", steps=3))
    busy = train(config(tmp_path / "busy", images, "schedulefree_adamw", steps=3,
                        output={"validation_every": 1}))
    assert progress_losses(busy.run_dir) == progress_losses(quiet.run_dir)
    assert final_validation(busy.run_dir) == final_validation(quiet.run_dir)

    monkeypatch.setattr(trainers.loop, "evaluation_weights", lambda optimizer: contextlib.nullcontext())
    unswitched = train(config(tmp_path / "unswitched", images, "schedulefree_adamw", steps=3))
    assert progress_losses(unswitched.run_dir) == progress_losses(quiet.run_dir)
    assert final_validation(unswitched.run_dir) != final_validation(quiet.run_dir)
    exported, trained_point = load_file(quiet.outputs["model"]), load_file(unswitched.outputs["model"])
    differing = [key for key in exported if not torch.equal(exported[key], trained_point[key])]
    assert differing, "the exported LoRA is the training point, not schedule-free's average"


@pytest.mark.parametrize(("optimizer", "given", "used", "origin"), [
    ("prodigy", 0.0, 1.0, "prodigy's default"),
    ("prodigy", 0.5, 0.5, "set"),
    ("adafactor", 0.0, 1e-2, "adafactor's default"),
    ("schedulefree_adamw", 0.0, 1e-4, "lora's default"),
    ("adamw", 3e-4, 3e-4, "set"),
])
def test_zero_means_the_optimizers_default_and_the_plan_says_which(tmp_path, images, optimizer, given, used, origin):
    summary = make_plan(config(tmp_path, images, optimizer, learning_rate=given)).summary()
    assert (summary["optimizer"], summary["learning_rate"], summary["learning_rate_from"]) == (optimizer, used, origin)
    assert f"learning_rate_from: {origin}" in summary["text"]


def test_a_missing_optimizer_package_names_the_pip_command(tmp_path, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what an absent package looks like to `import`
    with pytest.raises(ConfigError, match=r"pip install 'prodigyopt") as caught:
        make_plan(config(tmp_path, images, "prodigy"))
    assert caught.value.where == "train.optimizer"


def test_schedule_free_refuses_a_decaying_schedule(tmp_path, images):
    with pytest.raises(ConfigError, match="replaces the learning-rate schedule") as caught:
        make_plan(config(tmp_path, images, "schedulefree_adamw", train={"lr_scheduler": "cosine"}))
    assert caught.value.where == "train.lr_scheduler"


@pytest.mark.skipif(torch.cuda.is_available(), reason="8-bit Adam runs on a CUDA GPU")
def test_8bit_adam_without_a_gpu_fails_in_the_plan(tmp_path, images):
    with pytest.raises(ConfigError, match="needs a CUDA GPU") as caught:
        make_plan(config(tmp_path, images, "adamw8bit"))
    assert caught.value.where == "train.optimizer"
