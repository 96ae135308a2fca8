"""TensorBoard logs: what the run's events report, read back from the event files at the steps they were logged.
(DDPO's reward, logged across a stop and resume, is checked in test_method_ddpo.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainers.events import TensorBoardWriter
from trainers.loop import train

from train_helpers import make_images, read_events, tiny_config


def read_tensorboard(run_dir: Path) -> EventAccumulator:
    logs = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    logs.Reload()
    return logs


def scalar_steps(logs: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in logs.Scalars(tag)}


def test_a_run_logs_losses_learning_rates_validation_and_samples(tmp_path):
    images = make_images(tmp_path / "images", count=5)
    cfg = tiny_config(tmp_path, images, steps=4, lora={"train_text_encoder": True},
                      data={"validation_fraction": 0.2},
                      output={"tensorboard": True, "sample_prompts": ["a red disc"], "sample_every": 2,
                              "sample_steps": 2, "validation_every": 2})
    result = train(cfg)
    events = read_events(result.run_dir)
    logs = read_tensorboard(result.run_dir)

    progress = {e["step"]: e for e in events if e["event"] == "progress"}
    assert list(progress) == [1, 2, 3, 4] and len(progress[1]["lrs"]) == 2, "the text encoder has its own group"
    for tag, field in (("loss/train", "loss"), ("loss/train_avg", "loss_avg"), ("lr", "lr"),
                       ("train/loss_instance", "loss_instance")):
        logged = scalar_steps(logs, tag)
        assert list(logged) == list(progress), tag
        assert all(logged[step] == pytest.approx(e[field], rel=1e-6) for step, e in progress.items()), tag
    assert scalar_steps(logs, "lr/group_1") == pytest.approx({s: e["lrs"][1] for s, e in progress.items()})

    validation = {e["step"]: e["loss"] for e in events if e["event"] == "validation"}
    assert list(validation) == [2, 4]
    assert scalar_steps(logs, "loss/validation") == pytest.approx(validation)

    samples = [e["step"] for e in events if e["event"] == "sample"]
    assert samples == [2, 4]
    logged_images = logs.Images("samples/0")
    assert [image.step for image in logged_images] == samples
    assert (logged_images[0].width, logged_images[0].height) == (64, 64)


def test_without_tensorboard_the_writer_logs_nothing_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package looks like
    writer = TensorBoardWriter(tmp_path / "tensorboard")
    writer({"event": "progress", "step": 1, "loss": 0.5, "loss_avg": 0.5, "lr": 1e-4})
    writer.close()
    assert not (tmp_path / "tensorboard").exists()
