"""A training's life on a real ComfyUI when things go wrong: a Cancel sent while the trainer is still starting is
not lost, and a trainer whose ComfyUI is killed stops with a checkpoint instead of training on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import requests

from tests.comfy.client import ComfyClient

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "assets" / "sample_images"
OUR_PAGE = {"X-Finetune-Request": "1", "Content-Type": "application/json"}
LONG_RUN = "[output]\ntensorboard = false\ncheckpoint_every = 1000\n[train]\nwarmup_steps = 0\n"


def robots(server) -> str:
    folder = server.input_dir / "robots"
    folder.mkdir(exist_ok=True)
    for image in sorted(SAMPLE_IMAGES.glob("robot_0[1-2].png")):
        shutil.copy(image, folder / image.name)
    return folder.name


def long_training(folder: str, checkpoint: str, name: str) -> dict:
    images = {"folder": "(none)", "path": folder, "repeats": 1, "resolution": 64, "crop": "center", "flip": False,
              "bucketing": False}
    train = dict(base_checkpoint=checkpoint, dataset=["1", 0], method="LoRA", trigger_word="sks", class_noun="robot",
                 steps=5000, learning_rate=0.0, resolution=0, batch_size=1, train_text_encoder=False, rank=4,
                 alpha=4.0, seed=1, name=name, sample_prompts="", sample_every=0, advanced=LONG_RUN)
    return {"1": {"class_type": "FinetuneLoadTrainingImages", "inputs": images},
            "2": {"class_type": "FinetuneTrainLoRA", "inputs": train}}


def wait_for_record(server, name: str, predicate, timeout: float = 120, poll_s: float = 0.05) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (server.output_dir / "finetune").glob(f"{name}_*/run.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if predicate(record, path.parent):
                return record
        time.sleep(poll_s)
    raise AssertionError(f"no run {name} reached the expected state in {timeout} s:\n{server.log_tail()}")


def events_of(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_a_cancel_while_the_trainer_starts_is_not_lost(comfy_server, tiny_checkpoint):
    server = comfy_server
    client = ComfyClient(server.base_url)
    prompt_id = client.submit(long_training(robots(server), tiny_checkpoint, "early_cancel"))
    record = wait_for_record(server, "early_cancel",
                             lambda r, folder: r["status"] == "running" and r["pid"] and not events_of(folder))

    cancel = requests.post(f"{server.base_url}/finetune/runs/{record['id']}/cancel", headers=OUR_PAGE, data="{}",
                           timeout=30)
    assert cancel.status_code == 200 and cancel.json()["stopping"] is True

    result = client.wait(prompt_id, timeout=300)
    record = wait_for_record(server, "early_cancel", lambda r, folder: r["status"] not in ("queued", "running"))
    assert record["status"] == "cancelled" and record["step"] < 50, (record, result.status)


def test_a_trainer_stops_with_a_checkpoint_when_comfyui_is_killed(start_extra_server, tiny_checkpoint):
    server = start_extra_server()
    client = ComfyClient(server.base_url)
    client.submit(long_training(robots(server), tiny_checkpoint, "orphaned"))
    record = wait_for_record(server, "orphaned", lambda r, folder: any(
        e["event"] == "progress" for e in events_of(folder)), timeout=180)
    run_dir = server.output_dir / "finetune" / record["id"]
    trainer = psutil.Process(record["pid"])

    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)

    try:
        trainer.wait(timeout=120)  # psutil.TimeoutExpired here: the orphan trained on
    finally:
        if trainer.is_running():
            trainer.kill()
    done = [e for e in events_of(run_dir) if e["event"] == "done"]
    assert done and done[-1]["status"] == "stopped" and done[-1]["step"] < 5000
    assert any((run_dir / "checkpoints").glob("step_*"))
