"""Run records: round trip, atomic saves, reading events from an index, and settling runs a restart left behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.runfolder import CHECKPOINT_STATE_FILE, RunFolder


def make_record(runs, run_id="portrait_0a1b2c3d", **fields):
    values = dict(name="portrait", method="lora", base_model="sd15.safetensors", dataset_size=12, steps=400,
                  trigger_word="sks", class_noun="person", content_hash="0a1b2c3d" * 8, prompt_id="p1", node_id="7")
    values.update(fields)
    return runs.RunRecord(id=run_id, **values)


def write_events(run_dir: Path, events: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(e) + "\n" for e in events) + tail
    (run_dir / "events.jsonl").write_text(text, encoding="utf-8")


def test_a_record_survives_a_round_trip_through_disk(runs, tmp_path):
    store = runs.RunStore(tmp_path)
    record = make_record(runs, status="succeeded", started=100.0, finished=160.5, step=400, loss=0.0831,
                         outputs={"lora": "portrait.safetensors", "path": "/m/loras/portrait.safetensors",
                                  "samples": ["samples/step_000400_0.png"]})
    store.save(record)
    again = runs.RunStore(tmp_path).get(record.id)
    assert again == record
    assert again.duration == pytest.approx(60.5)
    data = json.loads((tmp_path / record.id / "run.json").read_text())
    assert data["duration"] == pytest.approx(60.5) and data["outputs"]["lora"] == "portrait.safetensors"
    assert runs.RunRecord.from_json(data) == record


def test_list_is_newest_first_and_skips_what_it_cannot_read(runs, tmp_path, caplog):
    store = runs.RunStore(tmp_path)
    for n, run_id in enumerate(["old_1", "new_2", "mid_3"]):
        store.save(make_record(runs, run_id, status="succeeded", created=[1.0, 3.0, 2.0][n]))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "run.json").write_text(json.dumps({"id": "odd", "name": "x", "status": "exploded"}))
    (tmp_path / ".class_images").mkdir()
    (tmp_path / "no_record").mkdir()
    assert [r.id for r in store.list()] == ["new_2", "mid_3", "old_1"]
    logged = caplog.text
    assert "broken" in logged and "odd" in logged


def test_save_is_atomic_and_leaves_no_temporary_files(runs, tmp_path):
    store = runs.RunStore(tmp_path)
    record = make_record(runs)
    store.save(record)
    before = (tmp_path / record.id / "run.json").stat().st_ino
    record.step = 7
    store.save(record)
    assert (tmp_path / record.id / "run.json").stat().st_ino != before, "rewritten in place instead of replaced"
    assert [p.name for p in (tmp_path / record.id).iterdir()] == ["run.json"]


def test_unknown_or_unsafe_run_ids_are_not_found(runs, tmp_path):
    store = runs.RunStore(tmp_path)
    assert store.get("nothing_here") is None
    assert store.get("../etc") is None and store.get("a/../../b") is None and store.get("") is None
    assert store.events("../../x") == [] and store.request_stop("../x") is False


def test_events_since_an_index_and_a_half_written_last_line(runs, tmp_path):
    store = runs.RunStore(tmp_path)
    events = [{"event": "plan"}] + [{"event": "progress", "step": n, "loss": 0.1} for n in range(1, 5)]
    write_events(tmp_path / "r1", events, tail='{"event": "progr')
    assert store.events("r1") == events
    assert store.events("r1", since=3) == events[3:]
    assert store.events("r1", since=99) == []
    assert store.events("missing") == []


def test_a_stop_request_writes_the_stop_file_of_a_running_run_only(runs, tmp_path):
    store = runs.RunStore(tmp_path)
    with runs.live("running_1"):
        store.save(make_record(runs, "running_1", status="running"))
        assert store.request_stop("running_1") is True
    assert (tmp_path / "running_1" / "STOP").is_file()
    store.save(make_record(runs, "done_1", status="succeeded"))
    assert store.request_stop("done_1") is False
    assert not (tmp_path / "done_1" / "STOP").exists()


@pytest.mark.parametrize("events, checkpoint, status, error", [
    ([{"event": "progress", "step": 3, "loss": 0.2}, {"event": "checkpoint", "step": 3, "path": "x"},
      {"event": "done", "status": "stopped", "step": 3}], True, "cancelled", ""),
    ([{"event": "progress", "step": 2, "loss": 0.3}, {"event": "error", "message": "train: the loss became nan"}],
     False, "failed", "train: the loss became nan"),
    ([{"event": "progress", "step": 5, "loss": 0.1}], True, "cancelled", "resume"),
    ([{"event": "plan"}], False, "failed", "start over"),
])
def test_a_run_left_running_by_a_restart_is_settled_from_its_events(runs, tmp_path, events, checkpoint, status, error):
    store = runs.RunStore(tmp_path)
    store.save(make_record(runs, "stale_1", status="running", started=10.0, pid=_dead_pid()))
    write_events(tmp_path / "stale_1", events)
    if checkpoint:
        complete = RunFolder(tmp_path / "stale_1").checkpoint(3)
        complete.mkdir(parents=True)
        (complete / CHECKPOINT_STATE_FILE).write_text("{}")
    record = store.get("stale_1")
    assert record.status == status and error in record.error
    assert record.finished is not None and record.pid == 0
    assert json.loads((tmp_path / "stale_1" / "run.json").read_text())["status"] == status, "not saved"
    progress = [e["step"] for e in events if e["event"] == "progress"]
    assert record.step == (progress[-1] if progress else 0)


def test_a_run_whose_trainer_finished_after_a_restart_is_settled_as_succeeded(runs, tmp_path):
    lora = tmp_path / "loras" / "portrait_2.safetensors"
    _write_lora(lora)
    run_dir = tmp_path / "runs" / "done_late"
    store = runs.RunStore(tmp_path / "runs")
    store.save(make_record(runs, "done_late", status="running", started=10.0))
    write_events(run_dir, [{"event": "progress", "step": 4, "loss": 0.05},
                           {"event": "done", "status": "succeeded", "step": 4,
                            "outputs": {"model": str(lora), "sample_0": str(run_dir / "samples" / "step_000004_0.png")}}])
    record = store.list()[0]
    assert record.status == "succeeded"
    assert record.outputs == {"lora": "portrait_2.safetensors", "path": str(lora),
                              "file": {"size": lora.stat().st_size,
                                       "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()},
                              "samples": ["samples/step_000004_0.png"]}
    assert runs.still_ours(record)
    made = store.made_loras()
    assert [m["name"] for m in made] == ["portrait_2.safetensors"] and made[0]["trigger_word"] == "sks"
    assert made[0]["metadata"]["family"] == "sd1" and made[0]["metadata"]["rank"] == "4"
    lora.unlink()
    assert store.made_loras() == []


@pytest.mark.parametrize("method, kind", [
    ("lora", "lora"), ("lora + DreamBooth", "lora"), ("ddpo", "lora"), ("full", "checkpoint"),
    ("full + DreamBooth", "checkpoint"), ("textual_inversion", "embedding"), ("controlnet", "controlnet"),
])
def test_the_output_kind_follows_the_method(runs, method, kind):
    assert make_record(runs, method=method).output_kind == kind


@pytest.mark.parametrize("method, kind, folder", [
    ("textual_inversion", "embedding", "embeddings"), ("controlnet", "controlnet", "controlnet"),
])
def test_an_embedding_or_controlnet_run_settled_after_a_restart_is_not_a_lora(runs, tmp_path, method, kind, folder):
    result = tmp_path / folder / "concept.safetensors"
    _write_lora(result)
    run_dir = tmp_path / "runs" / "done_late"
    store = runs.RunStore(tmp_path / "runs")
    store.save(make_record(runs, "done_late", method=method, status="running", started=10.0))
    write_events(run_dir, [{"event": "done", "status": "succeeded", "step": 4, "outputs": {"model": str(result)}}])
    record = store.get("done_late")
    assert record.status == "succeeded"
    assert record.outputs == {kind: "concept.safetensors", "path": str(result), "samples": [],
                              "file": {"size": result.stat().st_size,
                                       "sha256": hashlib.sha256(result.read_bytes()).hexdigest()}}
    assert "lora" not in json.loads((run_dir / "run.json").read_text())["outputs"]
    assert store.made_loras() == []


def test_a_run_this_process_drives_or_whose_trainer_lives_stays_running(runs, tmp_path):
    store = runs.RunStore(tmp_path)
    with runs.live("mine_1"):
        store.save(make_record(runs, "mine_1", status="running"))
        assert store.get("mine_1").status == "running"
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "trainers"])
    try:
        store.save(make_record(runs, "other_1", status="running", pid=trainer.pid))
        assert store.get("other_1").status == "running"
    finally:
        trainer.kill()
        trainer.wait()
    assert store.get("other_1").status == "failed"


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _write_lora(path: Path) -> None:
    header = json.dumps({"__metadata__": {"ss_base_model_version": "sd_v1", "ss_network_dim": "4"},
                         "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
