"""A stop request is honoured inside long sampling too (class images, sample images, DDPO trajectories), not only
between steps, and the run resumes from where it stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainers.events import StopSignal
from trainers.loop import train

from test_method_ddpo import ddpo_config
from train_helpers import read_events, tiny_config

REPO = Path(__file__).resolve().parents[2]


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


def test_a_stop_file_written_while_the_trainer_starts_is_honoured_and_an_older_one_is_not(tmp_path, images):
    cfg = tiny_config(tmp_path, images, steps=3)
    run_dir = tmp_path / "runs" / cfg.output.name
    run_dir.mkdir(parents=True)
    stop_file = run_dir / "STOP"

    stop_file.write_text("left from an earlier run\n")
    os.utime(stop_file, (time.time() - 60,) * 2)
    finished = train(cfg, stop=StopSignal(run_dir, since=time.time() - 1))
    assert finished.status == "succeeded" and not stop_file.exists()

    cfg.output.overwrite = True
    started = time.time() - 1  # the trainer began, then the Cancel arrived before it claimed the folder
    stop_file.write_text("stop requested from ComfyUI\n")
    stopped = train(cfg, stop=StopSignal(run_dir, since=started))
    assert stopped.status == "stopped" and stopped.steps_done == 0
    assert [e["status"] for e in read_events(run_dir) if e["event"] == "done"] == ["stopped"]


def test_an_orphaned_trainer_is_asked_to_stop(monkeypatch):
    stop = StopSignal()
    stop.stop_when_orphaned()
    assert not stop.requested()

    monkeypatch.setattr(os, "getppid", lambda: 1)  # re-parented: the process that started it is gone

    assert stop.requested()


def test_a_broken_events_pipe_asks_the_trainer_to_stop_and_nothing_more_is_written():
    script = ("import sys, time\n"
              "from trainers.events import StopSignal, events_to_parent\n"
              "stop = StopSignal()\nprinter = events_to_parent(stop)\n"
              "printer({'event': 'plan'})\n"
              "sys.stdin.readline()\n"  # the parent closes its end of stdout, then says go on
              "for n in range(3):\n    printer({'event': 'progress', 'step': n})\n"
              "print('stop requested' if stop.requested() else 'still training', file=sys.stderr)\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith('{"event": "plan"')
    child.stdout.close()
    child.stdin.write("go\n")
    child.stdin.close()
    error = child.stderr.read()
    assert child.wait(timeout=60) == 0
    assert "stop requested" in error and "Traceback" not in error
