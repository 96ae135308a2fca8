"""A stop request is honoured inside long sampling too (class images, sample images, DDPO trajectories), not only
between steps, and the run resumes from where it stopped."""

from __future__ import annotations

import pytest

from trainers.events import StopSignal
from trainers.loop import train

from test_method_ddpo import ddpo_config
from train_helpers import read_events, tiny_config


class StopAfterArming(StopSignal):
    """Says "stop" on the `nth` question asked after `arm()`: lands the request inside a chosen piece of work."""

    def __init__(self, nth: int):
        super().__init__()
        self.nth, self.asked, self.armed = nth, 0, False
        self.external_check = self._check

    def arm(self) -> None:
        self.armed = True

    def _check(self) -> bool:
        if not self.armed:
            return False
        self.asked += 1
        return self.asked >= self.nth


def test_a_stop_during_class_image_generation_ends_the_run_and_the_resume_continues_it(tmp_path, images):
    cfg = tiny_config(tmp_path, images, steps=2, data={"class_noun": "disc"},
                      dreambooth={"enabled": True, "num_class_images": 3, "class_generation_steps": 4})
    stop = StopAfterArming(nth=2)  # the second denoising step of the second class image

    def arm_after_first_image(event):
        if event["event"] == "status" and "class images 1/" in event.get("message", ""):
            stop.arm()

    first = train(cfg, callbacks=[arm_after_first_image], stop=stop)
    assert first.status == "stopped" and first.steps_done == 0
    class_images = sorted((tmp_path / "runs" / ".class_images").rglob("class_*.png"))
    assert len(class_images) == 1, "the interrupted image was kept, or generation went on after the stop"
    done = [e for e in read_events(first.run_dir) if e["event"] == "done"]
    assert done and done[-1]["status"] == "stopped"

    resumed = train(cfg, resume=True)
    assert resumed.status == "succeeded" and resumed.steps_done == 2
    assert len(sorted((tmp_path / "runs" / ".class_images").rglob("class_*.png"))) == 3


def test_a_stop_during_sample_images_skips_them_and_checkpoints(tmp_path, images):
    cfg = tiny_config(tmp_path, images, steps=4, output={"sample_every": 2, "sample_prompts": ["a sks disc"],
                                                         "sample_steps": 6})
    stop = StopAfterArming(nth=3)  # mid-way through the samples of step 2

    def arm_at_step_two(event):
        if event["event"] == "progress" and event["step"] == 2:
            stop.arm()

    first = train(cfg, callbacks=[arm_at_step_two], stop=stop)
    assert first.status == "stopped" and first.steps_done == 2
    events = read_events(first.run_dir)
    assert not [e for e in events if e["event"] == "sample"], "samples were finished although a stop was waiting"
    assert [e for e in events if e["event"] == "checkpoint" and e["step"] == 2]


def test_a_stop_during_ddpo_sampling_drops_the_partial_step_and_resumes_exactly(tmp_path):
    straight = train(ddpo_config(tmp_path / "a", steps=4))
    reference = [(e["loss"], e["reward_mean"]) for e in read_events(straight.run_dir) if e["event"] == "progress"]
    cfg = ddpo_config(tmp_path / "b", steps=4)
    stop = StopAfterArming(nth=3)  # past the loop's own check: inside the second epoch's sampling chain

    def arm_at_step_two(event):
        if event["event"] == "progress" and event["step"] == 2:
            stop.arm()

    first = train(cfg, callbacks=[arm_at_step_two], stop=stop)
    assert first.status == "stopped" and first.steps_done == 2
    assert stop.asked == 3, "the stop was not noticed inside the sampling chain"
    train(cfg, resume=True)
    resumed = [(e["loss"], e["reward_mean"]) for e in read_events(first.run_dir) if e["event"] == "progress"]
    assert len(resumed) == 4
    for step, (want, got) in enumerate(zip(reference, resumed), start=1):
        assert want == pytest.approx(got, abs=1e-5), f"step {step}"
