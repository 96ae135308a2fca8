"""ComfyUI's own `TrainLoraNode`, run through a real ComfyUI server on the same images, steps, rank, learning rate
and batch as our trainer.

The graph is the native one: LoadImageTextDataSetFromFolder -> MakeTrainingDataset (VAE + CLIP encode once) ->
TrainLoraNode -> SaveLoRA. Step times come from the node's progress messages on the websocket (one per optimizer
step), the memory from the server process: its RSS just before the prompt and its peak while the prompt runs.

The node is whichever ComfyUI's the host runs, so the comparison is always against that version's trainer: the
graph is built from the server's `/object_info` for TrainLoraNode. Inputs this bench does not choose (0.33 added
bucket_mode, offloading, bypass_mode, checkpoint_depth, quantized_backward) get the node's own defaults and are
reported; outputs are found by name (0.33 dropped the MODEL output, which moved `lora` and `steps`).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import websocket

from tests.comfy.client import ComfyClient
from tests.comfy.server import start_server

from .measure import RssWatcher, cpu_seconds
from .our_trainer import Setup

DATASET_FOLDER = "bench_images"
"""The subfolder of the server's input folder that the dataset node reads."""
TRAIN_NODE = "4"


def native_graph(checkpoint_name: str, setup: Setup, train_node: dict[str, Any], *,
                 gradient_checkpointing: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The API graph for this ComfyUI's TrainLoraNode (`train_node`: its /object_info entry), fp32 training and
    fp32 LoRA weights as our trainer runs on a CPU; and the inputs left at the node's defaults."""
    chosen = {"model": ["1", 0], "latents": ["3", 0], "positive": ["3", 1], "batch_size": setup.batch_size,
              "grad_accumulation_steps": 1, "steps": setup.steps, "learning_rate": setup.learning_rate,
              "rank": setup.rank, "optimizer": "AdamW", "loss_function": "MSE", "seed": setup.seed,
              "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "LoRA",
              "gradient_checkpointing": gradient_checkpointing, "existing_lora": "[None]"}
    inputs, defaulted = train_inputs(train_node, chosen)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": DATASET_FOLDER}},
        "3": {"class_type": "MakeTrainingDataset",
              "inputs": {"images": ["2", 0], "texts": ["2", 1], "vae": ["1", 2], "clip": ["1", 1]}},
        TRAIN_NODE: {"class_type": "TrainLoraNode", "inputs": inputs},
        "5": {"class_type": "SaveLoRA", "inputs": {"lora": [TRAIN_NODE, output_slot(train_node, "lora")],
                                                    "prefix": "loras/bench_native",
                                                    "steps": [TRAIN_NODE, output_slot(train_node, "steps")]}},
    }, defaulted


def train_inputs(train_node: dict[str, Any], chosen: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`chosen` for the node's required inputs, the node's default for the others (returned apart)."""
    required = train_node["input"]["required"]
    unknown = sorted(set(chosen) - set(required))
    if unknown:
        raise RuntimeError(f"this ComfyUI's TrainLoraNode has no input {', '.join(unknown)}: the bench's native "
                           "graph (bench/harness/native_trainer.py) needs updating for it")
    defaulted = {name: _default(spec) for name, spec in required.items() if name not in chosen}
    missing = sorted(name for name, value in defaulted.items() if value is None)
    if missing:
        raise RuntimeError(f"TrainLoraNode input {', '.join(missing)} has no default: choose a value for it in "
                           "bench/harness/native_trainer.py")
    return {**chosen, **defaulted}, defaulted


def output_slot(node: dict[str, Any], name: str) -> int:
    names = node.get("output_name") or []
    if name not in names:
        raise RuntimeError(f"this ComfyUI's TrainLoraNode has no output {name!r} (it has {names})")
    return names.index(name)


def _default(spec: list[Any]) -> Any:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    return choices[0] if choices else None


@dataclass
class NativeRun:
    step_stamps: dict[int, float] = field(default_factory=dict)
    cpu_stamps: dict[int, float] = field(default_factory=dict)
    peak_rss: int = 0
    """Bytes, of the server process while the prompt ran."""
    floor_rss: int = 0
    """Bytes the server held just before the prompt (started, nothing loaded)."""
    watcher: RssWatcher | None = None
    wall_s: float = 0.0
    log: Path | None = None
    comfyui_version: str = ""
    defaulted: dict[str, Any] = field(default_factory=dict)
    """TrainLoraNode inputs the bench does not choose, at the node's defaults."""


class ProgressClock:
    """Listens on the websocket and notes when each progress value of one node first arrives, and the server's CPU
    time at that moment."""

    def __init__(self, base_url: str, client_id: str, node_id: str, server: psutil.Process):
        self.url = base_url.replace("http://", "ws://", 1) + f"/ws?clientId={client_id}"
        self.node_id = node_id
        self.server = server
        self.stamps: dict[int, float] = {}
        self.cpu_stamps: dict[int, float] = {}
        self._socket: websocket.WebSocket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ProgressClock":
        self._socket = websocket.create_connection(self.url, timeout=30)
        self._socket.settimeout(1.0)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
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
            now = time.perf_counter()
            if not message:
                return
            if not isinstance(message, str):
                continue
            event = json.loads(message)
            data = event.get("data") or {}
            if event.get("type") == "progress" and str(data.get("node")) == self.node_id:
                step = int(data["value"])
                if step not in self.stamps:
                    self.stamps[step], self.cpu_stamps[step] = now, cpu_seconds(self.server)


def run_native(comfy_dir: Path, checkpoint_name: str, setup: Setup, workdir: Path, *, gradient_checkpointing: bool,
               extra_env: dict[str, str] | None = None, timeout_s: float = 3600) -> NativeRun:
    """One fresh server per run, so the prompt loads the checkpoint as a user's first run does."""
    if workdir.exists():
        shutil.rmtree(workdir)
    dataset = workdir / "input" / DATASET_FOLDER
    shutil.copytree(setup.images, dataset)
    server = start_server(comfy_dir, workdir, extra_env=extra_env)
    run = NativeRun(log=server.log_path)
    try:
        client = ComfyClient(server.base_url, client_id=uuid.uuid4().hex)
        run.comfyui_version = client.get("/system_stats").json()["system"].get("comfyui_version", "unknown")
        graph, run.defaulted = native_graph(checkpoint_name, setup, client.get("/object_info/TrainLoraNode").json()
                                            ["TrainLoraNode"], gradient_checkpointing=gradient_checkpointing)
        watcher = RssWatcher(server.process.pid, reset_peak=True)
        with ProgressClock(server.base_url, client.client_id, TRAIN_NODE, watcher.process) as clock:
            watcher.start()
            started = time.perf_counter()
            result = client.wait(client.submit(graph), timeout=timeout_s, poll_s=1.0)
            run.wall_s = time.perf_counter() - started
            run.peak_rss = watcher.stop()
        run.floor_rss, run.watcher = watcher.baseline, watcher
        run.step_stamps, run.cpu_stamps = dict(clock.stamps), dict(clock.cpu_stamps)
        if result.status != "success":
            raise RuntimeError(f"the native graph ended with {result.status}: {result.error}\n{server.log_tail(20)}")
    finally:
        server.stop()
    return run
