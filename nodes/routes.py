"""The HTTP routes of the Fine-tunes dashboard, under /finetune/ (ComfyUI serves them under /api/finetune/ too).

Answers are JSON (or an image, for files/). A malformed request is 400, something that is not there 404, a LoRA we
did not make 403, a request that does not fit the run's state 409, and a body over ComfyUI's size limit 413, each as
{"error": message}. Every path a request names is resolved, symlinks included, and must stay inside the folder it
belongs to: its run folder, or a models/loras folder.

Every request is refused (403) unless its Host is one this ComfyUI serves (see access.host_allowed: DNS rebinding
sends another name) and its Origin, when it has one, is that same server (`null` never is). A request that changes
something (POST, DELETE) also needs a JSON content type and the `X-Finetune-Request: 1` header our page sends: a
page elsewhere can only send those after a CORS preflight, which ComfyUI does not grant. GET handlers never write.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..trainers.runfolder import CONFIG_FILE, RunFolder
from .access import ALLOW_HOSTS_ENV, comfyui_listen_address, host_allowed, origin_allowed, settings_file
from .runs import ACTIVE_STATUSES, REQUEST_FILE, RunRecord, RunStore, still_ours
from .saved_prompts import load_prompt

log = logging.getLogger("comfyui-finetune")

PREFIX = "/finetune"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
RESUMABLE_STATUSES = ("cancelled", "failed")
PAGE_HEADER = "X-Finetune-Request"
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
MAX_SINCE_DIGITS = 15
_registered = False

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def register() -> None:
    """Add the routes to ComfyUI's server (once; before it starts serving, so that /api mirrors them). Outside a
    running ComfyUI (a script listing the nodes) there is no server, and nothing to do."""
    global _registered
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if _registered or prompt_server is None:
        return
    add_routes(prompt_server.routes)
    _registered = True


def add_routes(routes: web.RouteTableDef) -> None:
    routes.get(f"{PREFIX}/runs")(list_runs)
    routes.get(PREFIX + "/runs/{run_id}")(get_run)
    routes.get(PREFIX + "/runs/{run_id}/events")(run_events)
    routes.get(PREFIX + "/runs/{run_id}/files/{path:.+}")(run_file)
    routes.post(PREFIX + "/runs/{run_id}/cancel")(cancel_run)
    routes.post(PREFIX + "/runs/{run_id}/resume")(resume_run)
    routes.get(f"{PREFIX}/loras")(list_loras)
    routes.delete(PREFIX + "/loras/{name}")(delete_lora)


def json_errors(handler: Handler) -> Handler:
    """Turn every failure into a JSON answer with its status; an unexpected one is logged, never sent as a trace."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            check_sender(request)
            return await handler(request)
        except RequestError as error:
            return web.json_response({"error": str(error)}, status=error.status)
        except web.HTTPException as error:  # aiohttp's own, e.g. 413 for a body over the server's size limit
            return web.json_response({"error": error.reason}, status=error.status)
        except Exception as error:
            log.exception("comfyui-finetune: %s %s failed", request.method, request.path)
            return web.json_response({"error": f"internal error ({type(error).__name__})"}, status=500)

    return wrapped


def check_sender(request: web.Request) -> None:
    """Refuse a request that another web page (or a DNS-rebound name) sent; see the module's doc."""
    host = request.headers.get("Host", "")
    if not host_allowed(host, comfyui_listen_address()):
        raise RequestError(403, f"this ComfyUI does not answer the Fine-tunes routes for the host {host!r} — open "
                                "ComfyUI at its own address, or allow the name: add it to the environment variable "
                                f"{ALLOW_HOSTS_ENV} or to `hosts = [...]` in {settings_file()}")
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, host):
        raise RequestError(403, f"requests from the page at {origin!r} are refused: only ComfyUI's own page may use "
                                "the Fine-tunes routes")
    if request.method in STATE_CHANGING and (request.content_type != "application/json"
                                             or request.headers.get(PAGE_HEADER) != "1"):
        raise RequestError(403, f"a {request.method} to the Fine-tunes routes needs the JSON content type and the "
                                f"header {PAGE_HEADER}: 1 (as the Fine-tunes panel sends them)")


# ---- runs ------------------------------------------------------------------------------------------------------
@json_errors
async def list_runs(request: web.Request) -> web.Response:
    store = RunStore(read_only=True)
    runs = [record for record in store.list() if is_contained(store.run_dir(record.id), store.root)]
    return web.json_response({"runs": [record.to_json() for record in runs]})


@json_errors
async def get_run(request: web.Request) -> web.Response:
    store, record = find_run(request)
    run_dir = store.run_dir(record.id)
    return web.json_response({"run": record.to_json(), "config": read_config(run_dir),
                              "resumable": record.status in RESUMABLE_STATUSES and load_prompt(store, record) is not None,
                              "has_checkpoint": RunFolder(run_dir).has_checkpoint()})


@json_errors
async def run_events(request: web.Request) -> web.Response:
    store, record = find_run(request)
    since = request.query.get("since", "0")
    if not (since.isascii() and since.isdigit() and len(since) <= MAX_SINCE_DIGITS):
        raise RequestError(400, f"`since` must be the `next` of an earlier answer (a number, 0 or more), got "
                                f"{since[:40]!r}")
    events, after = store.events_after(record.id, int(since))
    return web.json_response({"events": events, "next": after, "status": record.status})


@json_errors
async def run_file(request: web.Request) -> web.FileResponse:
    store, record = find_run(request)
    run_dir = Path(os.path.realpath(store.run_dir(record.id)))
    path = contained(run_dir / relative_path(request.match_info["path"]), run_dir)
    if path.suffix.lower() not in IMAGE_TYPES:
        raise RequestError(400, "only a run's images (samples, loss chart) can be read")
    if not path.is_file():
        raise RequestError(404, f"run {record.id} has no file {request.match_info['path']!r}")
    return web.FileResponse(path, headers={"Content-Type": IMAGE_TYPES[path.suffix.lower()]})


@json_errors
async def cancel_run(request: web.Request) -> web.Response:
    store, record = find_run(request)
    if record.status not in ACTIVE_STATUSES or not store.request_stop(record.id):
        raise RequestError(409, f"run {record.id} is {record.status}, not running: there is nothing to cancel")
    return web.json_response({"run": record.to_json(), "stopping": True})


@json_errors
async def resume_run(request: web.Request) -> web.Response:
    """Queue again the workflow that started the run; its Train node finds the checkpoint and continues from it."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise RequestError(400, "the request body must be JSON, e.g. {\"client_id\": \"...\"}") from None
    store, record = find_run(request)
    if record.status not in RESUMABLE_STATUSES:
        raise RequestError(409, f"run {record.id} is {record.status}; only a cancelled or failed run can be resumed")
    saved = load_prompt(store, record)
    if saved is None:
        raise RequestError(409, f"the workflow that started run {record.id} is no longer known to ComfyUI — open it "
                                "and queue it again: it continues from the run's checkpoint")
    client_id = body.get("client_id") if isinstance(body, dict) else None
    prompt_id = await queue_prompt(saved["prompt"], saved.get("extra_data") or {}, client_id)
    return web.json_response({"run": record.to_json(), "prompt_id": prompt_id})


def find_run(request: web.Request) -> tuple[RunStore, RunRecord]:
    store, run_id = RunStore(read_only=request.method == "GET"), request.match_info["run_id"]
    try:
        store.run_dir(run_id)
    except ValueError:
        raise RequestError(400, f"not a run id: {run_id!r}") from None
    record = store.get(run_id) if is_contained(store.run_dir(run_id), store.root) else None
    if record is None:
        raise RequestError(404, f"no run {run_id!r}")
    return store, record


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The trainer's resolved config, or the config it was asked to start with while it has not written one."""
    for name in (CONFIG_FILE, REQUEST_FILE):
        try:
            return json.loads((run_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


async def queue_prompt(prompt: dict[str, Any], extra_data: dict[str, Any], client_id: str | None) -> str:
    """Queue an API graph the way POST /prompt does; returns the new prompt id."""
    import execution
    from server import PromptServer

    server = PromptServer.instance
    prompt_id = str(uuid.uuid4())
    valid = await execution.validate_prompt(prompt_id, prompt, None)
    if not valid[0]:
        message = valid[1].get("message", "invalid") if isinstance(valid[1], dict) else str(valid[1])
        raise RequestError(409, f"the run's workflow no longer validates ({message}) — open it, fix it and queue it")
    extra = {**extra_data, "create_time": int(time.time() * 1000)}
    if isinstance(client_id, str) and client_id:
        extra["client_id"] = client_id
    number = server.number
    server.number += 1
    server.prompt_queue.put((number, prompt_id, prompt, extra, valid[2], {}))
    return prompt_id


# ---- LoRA library -----------------------------------------------------------------------------------------------
@json_errors
async def list_loras(request: web.Request) -> web.Response:
    return web.json_response({"loras": RunStore(read_only=True).made_loras()})


@json_errors
async def delete_lora(request: web.Request) -> web.Response:
    """Delete a LoRA file one of our runs made; any other file in models/loras is left alone."""
    import folder_paths

    name = request.match_info["name"]
    if not name.endswith(".safetensors") or name.startswith(".") or any(c in name for c in "/\\\x00:"):
        raise RequestError(400, f"not a LoRA file name: {name!r}")
    store = RunStore()
    ours = next((lora for lora in store.made_loras() if lora["name"] == name), None)
    if ours is None:
        if folder_paths.get_full_path("loras", name) is not None:
            raise RequestError(403, f"{name} was not made by a fine-tune run; delete it yourself if you mean to")
        raise RequestError(404, f"no LoRA {name!r}")
    path = Path(ours["path"])
    folders = [Path(folder) for folder in folder_paths.get_folder_paths("loras")]
    if path.name != name or not any(is_contained(path, folder) for folder in folders):
        raise RequestError(403, f"{name} is not inside a models/loras folder; it is left alone")
    if not still_ours(store.get(ours["run_id"])):
        raise RequestError(409, f"{name} is no longer the file run {ours['run_id']} wrote (it was replaced, or the "
                                "run is older than the pack's record of file sizes and hashes); it is left alone — "
                                "delete it yourself if you mean to")
    path.unlink()
    return web.json_response({"deleted": name, "run_id": ours["run_id"]})


# ---- paths ------------------------------------------------------------------------------------------------------
def relative_path(text: str) -> Path:
    """A relative path made only of plain names: no `..`, `.`, empty parts, absolute roots, drives or backslashes."""
    parts = text.split("/")
    if (not text or "\\" in text or "\x00" in text or ":" in text
            or any(part in ("", ".", "..") for part in parts)):
        raise RequestError(400, f"not a plain relative path: {text!r}")
    return Path(*parts)


def is_contained(path: Path, folder: Path) -> bool:
    """Whether `path`, symlinks resolved, is `folder` (resolved) or lies inside it."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:  # different drives
        return False


def contained(path: Path, folder: Path) -> Path:
    """`path` resolved, or a 404 when it leaves `folder` (as if it were not there)."""
    if not is_contained(path, folder):
        raise RequestError(404, "no such file")
    return Path(os.path.realpath(path))
