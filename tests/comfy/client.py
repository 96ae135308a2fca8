"""A small client for a running ComfyUI: queue API graphs, wait for their results, listen to the websocket,
interrupt, upload images and find the images a run saved."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests
import websocket

# Websocket events kept by EventListener; the pack's own events all start with CUSTOM_EVENT_PREFIX.
STANDARD_EVENTS = ("progress", "executing", "executed", "execution_error", "execution_interrupted",
                   "execution_success", "progress_text")
CUSTOM_EVENT_PREFIX = "finetune."


class PromptRejected(RuntimeError):
    """The server refused the graph before running it (validation); `node_errors` says which inputs."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]):
        self.error = error
        self.node_errors = node_errors
        details = "; ".join(f"node {node_id}: {e.get('message') or e.get('type')} {e.get('details', '')}".strip()
                            for node_id, info in node_errors.items() for e in info.get("errors", []))
        super().__init__(f"prompt rejected: {error.get('message', error)}" + (f" ({details})" if details else ""))


@dataclass
class NodeError:
    node_id: str
    node_type: str
    message: str


@dataclass
class Result:
    prompt_id: str
    status: str
    """"success", "error" or "interrupted"."""
    outputs: dict[str, Any]
    error: NodeError | None = None
    messages: list[Any] = field(default_factory=list)

    def images(self) -> list[dict[str, Any]]:
        """Every image entry ({filename, subfolder, type}) in the outputs, in node order."""
        return [image for node_output in self.outputs.values() for image in node_output.get("images", [])]


class ComfyClient:
    def __init__(self, base_url: str, client_id: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.http = requests.Session()
        self._submitted: set[str] = set()
        self._listeners: list[EventListener] = []

    # ---- plain HTTP ------------------------------------------------------------------------------------------
    def get(self, path: str, **kwargs: Any) -> requests.Response:
        response = self.http.get(self.base_url + path, timeout=kwargs.pop("timeout", 30), **kwargs)
        response.raise_for_status()
        return response

    def post(self, path: str, payload: dict[str, Any] | None = None, **kwargs: Any) -> requests.Response:
        response = self.http.post(self.base_url + path, json=payload, timeout=kwargs.pop("timeout", 30), **kwargs)
        response.raise_for_status()
        return response

    def object_info(self, node_type: str | None = None) -> dict[str, Any]:
        if node_type is None:
            return self.get("/object_info").json()
        return self.get(f"/object_info/{node_type}").json()[node_type]

    # ---- running graphs ----------------------------------------------------------------------------------------
    def submit(self, graph: dict[str, Any], client_id: str | None = None) -> str:
        """Queue an API-format graph; returns its prompt id. Raises PromptRejected when validation fails."""
        response = self.http.post(self.base_url + "/prompt", timeout=30,
                                  json={"prompt": graph, "client_id": client_id or self.client_id})
        if response.status_code == 400:
            body = response.json()
            raise PromptRejected(body.get("error", {}), body.get("node_errors", {}))
        response.raise_for_status()
        prompt_id = response.json()["prompt_id"]
        self._submitted.add(prompt_id)
        return prompt_id

    def wait(self, prompt_id: str, timeout: float = 300, poll_s: float = 0.25) -> Result:
        """Poll /history until the prompt has finished (succeeded, failed or was interrupted).

        A prompt reaches the history before the websocket has delivered its last events, so every open listener
        of this client also waits for the prompt's final event: what a test reads from it afterwards is complete."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").json().get(prompt_id)
            if entry:  # a prompt enters the history only once it has finished
                if prompt_id in self._submitted:
                    for listener in list(self._listeners):
                        listener.wait_for_end_of(prompt_id)
                return _result(prompt_id, entry)
            time.sleep(poll_s)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, graph: dict[str, Any], timeout: float = 300) -> Result:
        return self.wait(self.submit(graph), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def settle(self, timeout: float = 120) -> bool:
        """Drop the pending prompts, interrupt the running one and wait until nothing runs; False on timeout."""
        self.post("/queue", {"clear": True})
        deadline = time.monotonic() + timeout
        while self.get("/queue").json().get("queue_running"):
            if time.monotonic() > deadline:
                return False
            self.interrupt()
            time.sleep(1)
        return True

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def upload_image(self, path: str | Path, subfolder: str = "", overwrite: bool = True) -> str:
        """Upload into the server's input folder; returns the name LoadImage-style inputs take."""
        path = Path(path)
        with open(path, "rb") as handle:
            response = self.http.post(self.base_url + "/upload/image", timeout=60,
                                      files={"image": (path.name, handle, "image/png")},
                                      data={"subfolder": subfolder, "overwrite": str(overwrite).lower()})
        response.raise_for_status()
        body = response.json()
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]

    def events(self) -> "EventListener":
        """A websocket listener for this client id; use as a context manager around submit/wait."""
        return EventListener(self.base_url, self.client_id, self._listeners)


def _result(prompt_id: str, entry: dict[str, Any]) -> Result:
    status = entry.get("status") or {}
    messages = status.get("messages", [])
    events = {event: data for event, data in messages}
    error = None
    if "execution_interrupted" in events:
        outcome = "interrupted"
    elif "execution_error" in events:
        outcome = "error"
        data = events["execution_error"]
        kind, text = data.get("exception_type", ""), str(data.get("exception_message", "")).strip()
        error = NodeError(str(data.get("node_id")), str(data.get("node_type")), f"{kind}: {text}" if kind else text)
    else:
        outcome = "success" if status.get("status_str") == "success" else "error"
    return Result(prompt_id, outcome, entry.get("outputs", {}), error, messages)


class EventListener:
    """Collects the websocket events of one client id on a background thread."""

    def __init__(self, base_url: str, client_id: str, registry: list["EventListener"] | None = None):
        self.url = base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + f"/ws?clientId={client_id}"
        self.events: list[dict[str, Any]] = []
        self._registry = registry if registry is not None else []
        self._changed = threading.Condition()
        self._socket: websocket.WebSocket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "EventListener":
        self._socket = websocket.create_connection(self.url, timeout=30)
        self._socket.settimeout(1.0)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._registry.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in self._registry:
            self._registry.remove(self)
        socket, self._socket = self._socket, None
        if socket is not None:
            socket.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _read(self) -> None:
        while self._socket is not None:
            try:
                message = self._socket.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):
                return
            if not message:
                return  # the connection was closed
            if not isinstance(message, str):
                continue  # binary frames are preview images
            event = json.loads(message)
            kind = event.get("type", "")
            if kind in STANDARD_EVENTS or kind.startswith(CUSTOM_EVENT_PREFIX):
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The `data` of every event of this type, in arrival order."""
        with self._changed:
            return [event.get("data", {}) for event in self.events if event["type"] == kind]

    def wait_for_end_of(self, prompt_id: str, timeout: float = 30) -> None:
        """Block until the server's last event of a prompt (`executing` with no node) has arrived."""
        self.wait_for(lambda e: e["type"] == "executing" and e["data"].get("node") is None
                      and e["data"].get("prompt_id") == prompt_id, timeout)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        """Block until an event (type + data) matching `predicate` has arrived; returns it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = next((event for event in self.events if predicate(event)), None)
                if match is not None:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    kinds = sorted({event["type"] for event in self.events})
                    raise TimeoutError(f"no matching websocket event within {timeout:.0f} s (saw: {', '.join(kinds)})")
                self._changed.wait(remaining)


def image_paths(result: Result, output_dir: str | Path) -> list[Path]:
    """Files on disk of the images a run saved into the output folder (not temp previews)."""
    root = Path(output_dir)
    return [root / image.get("subfolder", "") / image["filename"]
            for image in result.images() if image.get("type") == "output"]



def assert_clear_node_error(result: Result, node_type: str, expected: list[str], case: str = "") -> str:
    """The run ended in one single-line error of the pack (no traceback) from `node_type`, containing every string
    of `expected`; returns the message."""
    assert result.status == "error", f"{case}: {result.status}"
    assert result.error.node_type == node_type, result.error
    message = result.error.message
    for needle in expected:
        assert needle in message, f"{case}: {needle!r} not in {message!r}"
    assert message.startswith("finetune.NodeError: ") and "Traceback" not in message and "\n" not in message.strip()
    return message
