"""The command line: dry run, JSON events, exit codes, and two processes under `accelerate launch`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open

from train_helpers import TWO_CPU_PROCESSES, run_python, tiny_config


def run_cli(args: list[str], tmp_path: Path, *, launcher: list[str] | None = None, extra_env=None):
    return run_python((launcher or [sys.executable, "-m"]) + ["trainers", *args], tmp_path, extra_env=extra_env)


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def write_config(tmp_path: Path, images: Path, **sections) -> Path:
    path = tmp_path / "config.json"
    path.write_text(tiny_config(tmp_path, images, **sections).to_json())
    return path


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, images):
    config = write_config(tmp_path, images, steps=0)
    result = run_cli(["train", str(config), "--dry-run", "--events"], tmp_path)
    assert result.returncode == 0, result.stderr
    (plan,) = events_of(result.stdout)
    assert plan["event"] == "plan" and plan["images"] == 4
    assert plan["steps"] == 400, "steps default to 100 per image, clamped to 400-1200"
    assert plan["buckets"] == {"64x64": 4}
    assert not (tmp_path / "runs" / "tiny").exists()


def test_bad_input_is_one_error_event_and_exit_status_2(tmp_path, images):
    config = write_config(tmp_path, images, lora={"rank": 0})
    result = run_cli(["train", str(config), "--events"], tmp_path)
    assert result.returncode == 2
    errors = [e for e in events_of(result.stdout) if e["event"] == "error"]
    assert len(errors) == 1 and "lora.rank" in errors[0]["message"]
    assert "Traceback" not in result.stderr


def test_overrides_and_events_on_a_real_run(tmp_path, images):
    config = write_config(tmp_path, images, steps=10)
    result = run_cli(["train", str(config), "--events", "--set", "train.steps=2"], tmp_path)
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2]
    assert events[-1]["event"] == "done" and events[-1]["status"] == "succeeded"


def test_two_processes_under_accelerate_train_one_model_and_save_once(tmp_path, images):
    config = write_config(tmp_path, images, steps=3, train={"batch_size": 1})
    result = run_cli(["train", str(config), "--events"], tmp_path, launcher=TWO_CPU_PROCESSES + ["-m"],
                     extra_env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    events = events_of(result.stdout)
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 1, "only the main process reports and saves"
    assert done[0]["processes"] == 2, "accelerate silently ran a single process"
    assert done[0]["replicas_in_sync"] is True, "the two processes ended with different weights"
    saved = [e for e in events if e["event"] == "saved"]
    assert len(saved) == 1
    with safe_open(saved[0]["path"], "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
