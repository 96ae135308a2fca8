"""The dashboard's routes (/finetune/...) on a real ComfyUI server: runs written into its output folder are listed,
read and streamed as events; hostile paths and ids are refused without reading or deleting anything outside; a real
tiny training is followed, cancelled and resumed through them; only LoRAs our runs made can be deleted."""

from __future__ import annotations

import hashlib
import http.client
import os
import stat
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.comfy.training import SAMPLE_IMAGES, TINY_RUN, sample_images_in

PNG = (SAMPLE_IMAGES / "robot_01.png").read_bytes()
SECRET = b"\x89PNG\r\n\x1a\n secret outside every run folder"
STEPS = 16
OUR_PAGE = {"X-Finetune-Request": "1", "Content-Type": "application/json"}
"""What the pack's page sends with a request that changes something (tests/integration/test_route_senders.py
checks that requests without it are refused)."""


@pytest.fixture(autouse=True)
def as_our_page(comfy):
    comfy.http.headers.update(OUR_PAGE)


@pytest.fixture
def store(runs, comfy_server):
    return runs.RunStore(comfy_server.output_dir / "finetune")


@pytest.fixture
def new_run(runs, store):
    """new_run(status=..., **fields) saves a record with a fresh id into the server's runs folder."""

    def make(status: str = "succeeded", **fields):
        run_id = f"test_{uuid.uuid4().hex[:10]}"
        values = dict(name="robot", method="lora", base_model="tiny.safetensors", dataset_size=4, steps=10,
                      step=10 if status == "succeeded" else 3, status=status, trigger_word="sks", started=time.time() - 5,
                      finished=None if status in ("queued", "running") else time.time())
        values.update(fields)
        record = runs.RunRecord(id=run_id, **values)
        store.save(record)
        return record

    return make


@pytest.fixture
def loras_dir(comfyui_dir) -> Path:
    return comfyui_dir / "models" / "loras"


@pytest.fixture
def cleanup():
    paths: list[Path] = []
    yield paths.append
    for path in paths:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def raw_get(base_url: str, raw_path: str, method: str = "GET") -> tuple[int, bytes]:
    """Send the path exactly as written (no client-side normalising of `..` or percent escapes)."""
    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request(method, raw_path, body=b"{}" if method != "GET" else None, headers=OUR_PAGE)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def error_of(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    return response.json()["error"]


# ---- runs ------------------------------------------------------------------------------------------------------
def test_runs_are_listed_newest_first_under_both_prefixes(comfy, new_run):
    older = new_run("succeeded", created=time.time() - 60, outputs={"samples": ["samples/step_000010_0.png"]})
    newer = new_run("failed", error="out of memory", created=time.time())

    for prefix in ("/finetune", "/api/finetune"):
        listed = comfy.get(f"{prefix}/runs").json()["runs"]
        ids = [run["id"] for run in listed]
        assert ids.index(newer.id) < ids.index(older.id)
        shown = next(run for run in listed if run["id"] == newer.id)
        assert shown["status"] == "failed" and shown["error"] == "out of memory"
        assert shown["dataset_size"] == 4 and shown["method"] == "lora" and shown["duration"] > 0


def test_a_run_its_config_and_its_events_from_where_the_last_answer_stopped(comfy, store, new_run):
    record = new_run("succeeded")
    run_dir = store.run_dir(record.id)
    (run_dir / "config.json").write_text(json.dumps({"train": {"steps": 10}}))
    events = [{"event": "progress", "step": n, "total": 10, "loss": 0.5 / n} for n in range(1, 6)]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "prog')

    body = comfy.get(f"/finetune/runs/{record.id}").json()
    assert body["run"]["id"] == record.id and body["config"] == {"train": {"steps": 10}}
    assert body["resumable"] is False and body["has_checkpoint"] is False
    everything = comfy.get(f"/finetune/runs/{record.id}/events").json()
    assert [e["step"] for e in everything["events"]] == [1, 2, 3, 4, 5]
    with open(run_dir / "events.jsonl", "a") as log:
        log.write('ress", "step": 6}\n')
    later = comfy.get(f"/finetune/runs/{record.id}/events", params={"since": everything["next"]}).json()
    assert later["events"] == [{"event": "progress", "step": 6}]
    end = comfy.get(f"/finetune/runs/{record.id}/events", params={"since": later["next"]}).json()
    assert end["events"] == [] and end["next"] == later["next"] == (run_dir / "events.jsonl").stat().st_size
    for since in ("-1", "abc", "1.5", "9" * 5000):
        response = comfy.http.get(f"{comfy.base_url}/finetune/runs/{record.id}/events", params={"since": since})
        assert response.status_code == 400 and "since" in error_of(response)


def test_sample_images_are_served_from_the_run_folder(comfy, store, new_run):
    record = new_run("succeeded")
    samples = store.run_dir(record.id) / "samples"
    samples.mkdir()
    (samples / "step_000010_0.png").write_bytes(PNG)

    response = comfy.get(f"/api/finetune/runs/{record.id}/files/samples/step_000010_0.png")
    assert response.headers["Content-Type"] == "image/png" and response.content == PNG


def test_unknown_runs_are_404_in_json(comfy):
    for path in ("/finetune/runs/no_such_run", "/finetune/runs/no_such_run/events",
                 "/finetune/runs/no_such_run/files/samples/a.png"):
        response = comfy.http.get(comfy.base_url + path)
        assert response.status_code == 404 and "no_such_run" in error_of(response)
    response = comfy.http.post(comfy.base_url + "/finetune/runs/no_such_run/cancel")
    assert response.status_code == 404 and "no_such_run" in error_of(response)


# ---- hostile paths -----------------------------------------------------------------------------------------------
@pytest.fixture
def hostile_setup(comfy_server, store, new_run, tmp_path, cleanup):
    """A run with a sample, a secret PNG beside the runs folder and one outside ComfyUI, and a symlink pointing out."""
    record = new_run("succeeded")
    run_dir = store.run_dir(record.id)
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "ok.png").write_bytes(PNG)
    beside = comfy_server.output_dir / f"secret_{record.id}.png"
    beside.write_bytes(SECRET)
    cleanup(beside)
    outside = tmp_path / "secret.png"
    outside.write_bytes(SECRET)
    (run_dir / "samples" / "link_out.png").symlink_to(outside)
    (run_dir / "samples" / "dir_out").symlink_to(tmp_path, target_is_directory=True)
    return record.id, beside.name, outside


HOSTILE_FILES = [
    "../run.json", "../../secret_{id}.png", "samples/../../secret_{id}.png", "..%2f..%2fsecret_{id}.png",
    "%2e%2e/%2e%2e/secret_{id}.png", "samples%2f..%2f..%2f..%2fsecret_{id}.png", "%2e%2e%2f%2e%2e%2fsecret_{id}.png",
    "samples/%252e%252e/%252e%252e/secret_{id}.png", "{outside}", "%2F{outside_escaped}", "samples/link_out.png",
    "samples/dir_out/secret.png", "samples\\..\\..\\secret_{id}.png", "samples%5c..%5c..%5csecret_{id}.png",
    "samples/./ok.png", "samples//ok.png", "C:%5cwindows%5csecret.png", "run.json", "config.json",
]


@pytest.mark.parametrize("path", HOSTILE_FILES)
def test_hostile_file_paths_are_refused(comfy_server, hostile_setup, path):
    run_id, beside, outside = hostile_setup
    path = path.format(id=run_id, outside=outside, outside_escaped=str(outside).lstrip("/").replace("/", "%2F"))

    status, body = raw_get(comfy_server.base_url, f"/finetune/runs/{run_id}/files/{path}")

    assert status in (400, 404), (status, body[:200])
    assert SECRET not in body and PNG not in body


def test_the_plain_sample_beside_those_is_served(comfy_server, hostile_setup):
    run_id, _, _ = hostile_setup
    assert raw_get(comfy_server.base_url, f"/finetune/runs/{run_id}/files/samples/ok.png") == (200, PNG)


@pytest.mark.parametrize("run_id", ["..", "%2e%2e", ".hidden", "a%20b", "x" * 300, "%2Fetc", "a%00b", "-rf"])
def test_bad_run_ids_are_refused(comfy_server, run_id):
    for suffix in ("", "/events", "/files/samples/ok.png"):
        status, body = raw_get(comfy_server.base_url, f"/finetune/runs/{run_id}{suffix}")
        assert status in (400, 404), (run_id, suffix, status, body[:200])
        assert b"Traceback" not in body
    status, _ = raw_get(comfy_server.base_url, f"/finetune/runs/{run_id}/cancel", method="POST")
    assert status in (400, 404)


def test_a_symlinked_run_folder_pointing_out_is_not_read(comfy_server, store, new_run, tmp_path, cleanup):
    record = new_run("succeeded")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "x.png").write_bytes(SECRET)
    (tmp_path / "run.json").write_text((store.run_dir(record.id) / "run.json").read_text().replace(record.id, "linked_out"))
    link = store.root / "linked_out"
    link.symlink_to(tmp_path, target_is_directory=True)
    cleanup(link)

    status, body = raw_get(comfy_server.base_url, "/finetune/runs/linked_out/files/samples/x.png")
    assert status == 404 and SECRET not in body


# ---- cancel and resume --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_trainer():
    """A process that passes for a live trainer (its command line names `trainers`), so a record stays running."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "trainers"])
    yield process.pid
    process.kill()
    process.wait()


def test_cancel_asks_a_running_run_to_stop_and_refuses_one_that_is_not(comfy, store, new_run, fake_trainer):
    running = new_run("running", pid=fake_trainer)
    done = new_run("succeeded")

    response = comfy.post(f"/finetune/runs/{running.id}/cancel").json()
    assert response["stopping"] is True and (store.run_dir(running.id) / "STOP").is_file()
    refused = comfy.http.post(f"{comfy.base_url}/finetune/runs/{done.id}/cancel")
    assert refused.status_code == 409 and "succeeded" in error_of(refused)
    assert not (store.run_dir(done.id) / "STOP").exists()


def test_resume_queues_the_saved_workflow_again(comfy, store, new_run):
    record = new_run("cancelled", error="cancelled at step 3")
    graph = {"1": {"class_type": "PrimitiveString", "inputs": {"value": f"resumed {record.id}"}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    (store.run_dir(record.id) / "prompt.json").write_text(json.dumps({"prompt": graph, "extra_data": {}}))
    assert comfy.get(f"/finetune/runs/{record.id}").json()["resumable"] is True

    prompt_id = comfy.post(f"/finetune/runs/{record.id}/resume", {"client_id": comfy.client_id}).json()["prompt_id"]

    result = comfy.wait(prompt_id, timeout=120)
    assert result.status == "success" and "".join(result.outputs["2"]["text"]) == f"resumed {record.id}"


def test_resume_refuses_what_cannot_be_resumed(comfy, store, new_run):
    finished = new_run("succeeded")
    unknown_workflow = new_run("cancelled", prompt_id="not-a-prompt-comfyui-knows")
    invalid = new_run("cancelled")
    (store.run_dir(invalid.id) / "prompt.json").write_text(json.dumps(
        {"prompt": {"1": {"class_type": "NoSuchNodeType", "inputs": {}}}}))

    for record, status, needle in ((finished, 409, "succeeded"), (unknown_workflow, 409, "queue it again"),
                                   (invalid, 409, "no longer validates")):
        response = comfy.http.post(f"{comfy.base_url}/finetune/runs/{record.id}/resume", json={})
        assert response.status_code == status and needle in error_of(response), record.id
    garbled = comfy.http.post(f"{comfy.base_url}/finetune/runs/{invalid.id}/resume", data="{not json",
                              headers={"Content-Type": "application/json"})
    assert garbled.status_code == 400 and "JSON" in error_of(garbled)


# ---- the LoRA library -----------------------------------------------------------------------------------------------
@pytest.fixture
def lora_of_ours(new_run, loras_dir, cleanup):
    """new LoRA file in models/loras with a succeeded run that made it; returns (record, path)."""

    def make(path: Path | None = None):
        path = path or loras_dir / f"ours_{uuid.uuid4().hex[:8]}.safetensors"
        if not path.exists() and not path.is_symlink():
            path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
        cleanup(path)
        written = path.read_bytes() if path.is_file() else b""
        record = new_run("succeeded", trigger_word="sks", outputs={
            "lora": path.name, "path": str(path), "samples": [],
            "file": {"size": len(written), "sha256": hashlib.sha256(written).hexdigest()}})
        return record, path

    return make


def test_the_library_lists_our_loras_only(comfy, lora_of_ours, loras_dir, cleanup):
    record, path = lora_of_ours()
    foreign = loras_dir / f"foreign_{uuid.uuid4().hex[:8]}.safetensors"
    foreign.write_bytes(b"not ours")
    cleanup(foreign)

    listed = {lora["name"]: lora for lora in comfy.get("/finetune/loras").json()["loras"]}
    assert listed[path.name]["run_id"] == record.id and listed[path.name]["trigger_word"] == "sks"
    assert "size_mb" in listed[path.name]["metadata"] and foreign.name not in listed


def test_deleting_our_lora_removes_only_that_file(comfy, lora_of_ours, loras_dir):
    _, path = lora_of_ours()
    _, other = lora_of_ours()

    response = comfy.http.delete(f"{comfy.base_url}/api/finetune/loras/{path.name}")

    assert response.status_code == 200 and response.json()["deleted"] == path.name
    assert not path.exists() and other.is_file()
    assert path.name not in {lora["name"] for lora in comfy.get("/finetune/loras").json()["loras"]}


def test_delete_leaves_a_file_saved_later_under_our_loras_name(comfy, lora_of_ours, new_run, loras_dir, cleanup):
    _, replaced = lora_of_ours()
    replaced.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{} the user's own LoRA, saved over ours")
    unrecorded = loras_dir / f"old_{uuid.uuid4().hex[:8]}.safetensors"
    unrecorded.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    cleanup(unrecorded)
    new_run("succeeded", outputs={"lora": unrecorded.name, "path": str(unrecorded), "samples": []})

    for path in (replaced, unrecorded):
        response = comfy.http.delete(f"{comfy.base_url}/finetune/loras/{path.name}")
        assert response.status_code == 409 and "no longer the file" in error_of(response), path.name
        assert path.is_file()


def test_delete_refuses_a_lora_we_did_not_make(comfy, loras_dir, cleanup):
    foreign = loras_dir / f"foreign_{uuid.uuid4().hex[:8]}.safetensors"
    foreign.write_bytes(b"someone else's LoRA")
    cleanup(foreign)

    response = comfy.http.delete(f"{comfy.base_url}/finetune/loras/{foreign.name}")

    assert response.status_code == 403 and "not made by" in error_of(response)
    assert foreign.read_bytes() == b"someone else's LoRA"
    missing = comfy.http.delete(f"{comfy.base_url}/finetune/loras/no_such_{uuid.uuid4().hex}.safetensors")
    assert missing.status_code == 404


def test_delete_refuses_a_record_that_points_outside_models_loras(comfy, lora_of_ours, loras_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(SECRET)
    _, claimed = lora_of_ours(outside)
    link = loras_dir / f"link_{uuid.uuid4().hex[:8]}.safetensors"
    link.symlink_to(outside)
    _, linked = lora_of_ours(link)

    for name in (claimed.name, linked.name):
        response = comfy.http.delete(f"{comfy.base_url}/finetune/loras/{name}")
        assert response.status_code in (403, 404), name
    assert outside.read_bytes() == SECRET and link.is_symlink()


@pytest.mark.parametrize("name", ["..%2f..%2fconfig.safetensors", "%2e%2e", "..", "notes.txt", ".hidden.safetensors",
                                  "a%5c..%5cb.safetensors", "a%00.safetensors", "%2Fetc%2Fpasswd"])
def test_hostile_lora_names_are_refused(comfy_server, lora_of_ours, name):
    _, canary = lora_of_ours()
    status, body = raw_get(comfy_server.base_url, f"/finetune/loras/{name}", method="DELETE")
    assert status in (400, 404), (name, status, body[:200])
    assert canary.is_file() and b"Traceback" not in body


# ---- a real tiny training, followed through the routes ---------------------------------------------------------------
@pytest.fixture(scope="module")
def robots(comfy_server) -> str:
    """Four captioned sample images in a subfolder of the server's input folder; returns its name."""
    return sample_images_in(comfy_server.input_dir, "route_robots").name


def training_graph(checkpoint: str, folder: str, name: str, steps: int) -> dict:
    return {
        "1": {"class_type": "FinetuneLoadTrainingImages",
              "inputs": {"folder": folder, "path": "", "repeats": 1, "resolution": 64, "crop": "center",
                         "flip": False, "bucketing": False}},
        "2": {"class_type": "FinetuneTrainLoRA",
              "inputs": {"base_checkpoint": checkpoint, "dataset": ["1", 0], "method": "LoRA", "trigger_word": "sks",
                         "class_noun": "robot", "steps": steps, "learning_rate": 1e-4, "resolution": 0,
                         "batch_size": 1, "train_text_encoder": False, "rank": 4, "alpha": 4.0, "seed": 5,
                         "name": name, "sample_prompts": "a photo of {trigger} {class}", "sample_every": 0,
                         "advanced": TINY_RUN}},
    }


def sample_path(record: dict) -> str:
    return record["outputs"]["samples"][0]


def test_a_real_training_is_followed_cancelled_and_resumed(comfy, comfy_server, tiny_checkpoint, robots, cleanup):
    name = f"routes_{uuid.uuid4().hex[:6]}"
    with comfy.events() as events:
        prompt_id = comfy.submit(training_graph(tiny_checkpoint, robots, name, steps=STEPS))
        started = events.wait_for(lambda e: e["type"] == "finetune.progress" and e["data"]["step"] >= 3, timeout=300)
        run_id = started["data"]["run_id"]
        assert started["data"]["node_id"] == "2"

        running = comfy.get(f"/finetune/runs/{run_id}").json()
        assert running["run"]["status"] == "running" and running["config"]["train"]["steps"] == STEPS
        steps = [e["step"] for e in comfy.get(f"/finetune/runs/{run_id}/events").json()["events"]
                 if e["event"] == "progress"]
        assert steps[:3] == [1, 2, 3]
        assert comfy.post(f"/finetune/runs/{run_id}/cancel").json()["stopping"] is True
        assert comfy.wait(prompt_id, timeout=300).status == "interrupted"

    cancelled = comfy.get(f"/finetune/runs/{run_id}").json()
    assert cancelled["run"]["status"] == "cancelled" and cancelled["has_checkpoint"] and cancelled["resumable"]
    stopped_at = cancelled["run"]["step"]
    assert 3 <= stopped_at < STEPS

    resumed = comfy.post(f"/finetune/runs/{run_id}/resume", {"client_id": comfy.client_id}).json()["prompt_id"]
    result = comfy.wait(resumed, timeout=600)
    assert result.status == "success", result.error

    finished = comfy.get(f"/finetune/runs/{run_id}").json()["run"]
    assert finished["status"] == "succeeded" and finished["step"] == STEPS
    lora = Path(finished["outputs"]["path"])
    cleanup(lora)
    umask = os.umask(0o022)
    os.umask(umask)  # the server's: it inherits this process's
    for written in (lora, Path(comfy_server.output_dir) / "finetune" / run_id / sample_path(finished)):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, f"{written} has mkstemp's private mode"
    progress = [e["step"] for e in comfy.get(f"/finetune/runs/{run_id}/events").json()["events"]
                if e["event"] == "progress"]
    assert progress[-1] == STEPS and stopped_at + 1 in progress[progress.index(stopped_at) + 1:]
    sample = finished["outputs"]["samples"][0]
    image = comfy.get(f"/finetune/runs/{run_id}/files/{sample}")
    assert image.headers["Content-Type"] == "image/png" and image.content.startswith(b"\x89PNG")
    assert finished["outputs"]["lora"] in {entry["name"] for entry in comfy.get("/finetune/loras").json()["loras"]}
    assert comfy.http.delete(f"{comfy.base_url}/finetune/loras/{lora.name}").status_code == 200
    assert not lora.exists()
