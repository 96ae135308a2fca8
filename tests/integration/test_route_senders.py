"""Who may use the dashboard's routes on a real ComfyUI: a request with another Host (DNS rebinding), from a page
with `Origin: null` or another origin, or a state-changing one without our page's JSON content type and header is
refused with 403 and a message; a body over ComfyUI's size limit is 413. The refused requests change nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

OUR_PAGE = {"X-Finetune-Request": "1", "Content-Type": "application/json"}


@pytest.fixture
def running_run(comfy_server):
    """A run marked running, with a process that passes for its live trainer (its command line names `trainers`)."""
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "trainers"])
    run_id = f"senders_{uuid.uuid4().hex[:10]}"
    folder = Path(comfy_server.output_dir) / "finetune" / run_id
    folder.mkdir(parents=True)
    record = {"id": run_id, "name": "robot", "status": "running", "method": "lora", "created": time.time(),
              "started": time.time(), "pid": trainer.pid}
    (folder / "run.json").write_text(json.dumps(record))
    (folder / "events.jsonl").write_text('{"event": "plan"}\n')
    yield run_id, folder
    trainer.kill()
    trainer.wait()


def url(comfy_server, path: str) -> str:
    return comfy_server.base_url + path


def error_of(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    return response.json()["error"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8188", "192.0.2.7"])
def test_a_request_for_another_host_is_refused(comfy_server, running_run, host):
    for method, path in (("GET", "/finetune/runs"), ("GET", "/api/finetune/loras"),
                         ("POST", f"/finetune/runs/{running_run[0]}/cancel")):
        response = requests.request(method, url(comfy_server, path), headers={**OUR_PAGE, "Host": host}, data="{}",
                                    timeout=30)
        assert response.status_code == 403, (method, path, response.text)
        assert host.split(":")[0] in error_of(response) and "COMFYUI_FINETUNE_ALLOW_HOSTS" in error_of(response)
    assert not (running_run[1] / "STOP").exists()


def test_loopback_names_are_served(comfy_server):
    port = comfy_server.base_url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        response = requests.get(url(comfy_server, "/finetune/runs"), headers={"Host": host}, timeout=30)
        assert response.status_code == 200, host


@pytest.fixture
def allowed_host(comfy_server):
    """mybox.lan allowed in the server's access.toml, as for a ComfyUI that listens on the network."""
    path = comfy_server.input_dir.parent / "user" / "comfyui-finetune" / "access.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('hosts = ["mybox.lan"]\n')
    yield "mybox.lan"
    path.unlink()


@pytest.mark.parametrize("host, origin", [(None, "null"), ("mybox.lan", "null"), ("mybox.lan", "http://evil.example"),
                                          ("mybox.lan", "http://mybox.lan:1")])
def test_a_request_from_another_page_is_refused(comfy_server, running_run, allowed_host, host, origin):
    headers = {**OUR_PAGE, "Origin": origin, **({"Host": host} if host else {})}
    for method, path in (("GET", "/finetune/runs"), ("POST", f"/finetune/runs/{running_run[0]}/cancel")):
        response = requests.request(method, url(comfy_server, path), headers=headers, data="{}", timeout=30)
        assert response.status_code == 403 and "only ComfyUI's own page" in error_of(response), (method, origin)
    assert not (running_run[1] / "STOP").exists()


def test_an_allowed_host_is_served_with_its_own_origin(comfy_server, running_run, allowed_host):
    headers = {**OUR_PAGE, "Host": allowed_host, "Origin": f"http://{allowed_host}"}
    assert requests.get(url(comfy_server, "/finetune/runs"), headers=headers, timeout=30).status_code == 200
    response = requests.post(url(comfy_server, f"/finetune/runs/{running_run[0]}/cancel"), headers=headers,
                             data="{}", timeout=30)
    assert response.status_code == 200 and (running_run[1] / "STOP").is_file()


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/plain", "X-Finetune-Request": "1"},
                                     {"Content-Type": "application/x-www-form-urlencoded"},
                                     {"Content-Type": "application/json"}])
def test_a_state_changing_request_needs_our_pages_headers(comfy_server, running_run, headers):
    response = requests.post(url(comfy_server, f"/finetune/runs/{running_run[0]}/cancel"), headers=headers,
                             data="{}", timeout=30)

    assert response.status_code == 403 and "X-Finetune-Request" in error_of(response)
    assert not (running_run[1] / "STOP").exists()
    accepted = requests.post(url(comfy_server, f"/finetune/runs/{running_run[0]}/cancel"), headers=OUR_PAGE,
                             data="{}", timeout=30)
    assert accepted.status_code == 200 and (running_run[1] / "STOP").is_file()


def test_a_body_over_comfyuis_limit_is_413(comfy_server, running_run):
    too_big = b"{" + b" " * (100 * 2**20 + 1024) + b"}"  # ComfyUI's default --max-upload-size is 100 MB

    response = requests.post(url(comfy_server, f"/finetune/runs/{running_run[0]}/resume"), headers=OUR_PAGE,
                             data=too_big, timeout=60)

    assert response.status_code == 413, response.text[:200]


def test_get_handlers_never_write(comfy_server):
    """A record left "running" by a trainer that is gone is shown settled, but the GET leaves the disk alone."""
    run_id = f"senders_{uuid.uuid4().hex[:10]}"
    folder = Path(comfy_server.output_dir) / "finetune" / run_id
    folder.mkdir(parents=True)
    record = json.dumps({"id": run_id, "name": "robot", "status": "running", "created": time.time(), "pid": 0,
                         "prompt_id": "not-known"})
    (folder / "run.json").write_text(record)
    before = sorted(p.name for p in folder.iterdir())

    listed = requests.get(url(comfy_server, "/finetune/runs"), timeout=30).json()["runs"]
    shown = requests.get(url(comfy_server, f"/finetune/runs/{run_id}"), timeout=30).json()["run"]

    assert next(run for run in listed if run["id"] == run_id)["status"] == shown["status"] == "failed"
    assert (folder / "run.json").read_text() == record and sorted(p.name for p in folder.iterdir()) == before
