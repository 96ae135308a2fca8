"""Run the main example workflow end to end in a real ComfyUI: the bundled sample images in, a LoRA and images out.

    python scripts/demo.py              # (make demo) the tiny test checkpoint, a few dozen steps: minutes on a CPU
    FINETUNE_DEMO_CHECKPOINT=v1-5-pruned-emaonly.safetensors python scripts/demo.py
                                        # a real checkpoint from ComfyUI's models/checkpoints, the workflow's own steps

The LoRA lands in ComfyUI's models/loras/ and the generated images in its output/ folder.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts import host  # noqa: E402
from tests.comfy.client import ComfyClient, EventListener, PromptRejected, image_paths, newest_files  # noqa: E402
from tests.comfy.server import (ServerError, check_pack_loaded, expected_node_ids, pack_nodes,  # noqa: E402
                                prepare_host, start_server, tiny_checkpoint_name)
from tests.comfy.workflow import WorkflowError, to_api_graph  # noqa: E402

WORKFLOW = REPO / "example_workflows" / "01_photos_to_lora.json"
SAMPLES = REPO / "assets" / "sample_images"
CHECKPOINT_ENV = "FINETUNE_DEMO_CHECKPOINT"
TIMEOUT_S = 3 * 3600
# With the tiny random checkpoint only the plumbing is real: keep every loop short.
QUICK_PACK_SETTINGS = {"steps": 30, "max_steps": 30, "resolution": 64, "sample_steps": 4, "num_images": 2}
QUICK_STOCK_SETTINGS = {"steps": 4, "width": 64, "height": 64}
FOLDER_WORDS = ("folder", "directory", "path")


class DemoError(RuntimeError):
    pass


def main() -> int:
    try:
        return run_demo()
    except (DemoError, ServerError, WorkflowError, PromptRejected) as error:
        print(f"demo: FAILED: {error}", file=sys.stderr)
        return 1


def run_demo() -> int:
    if not WORKFLOW.is_file():
        raise DemoError(f"{WORKFLOW.relative_to(REPO)} does not exist yet: the example workflow is needed for the demo")
    real_checkpoint = os.environ.get(CHECKPOINT_ENV, "").strip()
    comfy = host.ensure_host() if real_checkpoint else prepare_host(("sd1",))
    checkpoint = real_checkpoint or tiny_checkpoint_name(comfy)
    if not (comfy / "models" / "checkpoints" / checkpoint).is_file():
        raise DemoError(f"{CHECKPOINT_ENV}={checkpoint}: no such file in {comfy / 'models' / 'checkpoints'}")
    print(f"demo: ComfyUI at {comfy}\ndemo: base checkpoint {checkpoint}" + ("" if real_checkpoint else " (tiny, random weights: the images will be noise)"))

    expected, warnings = expected_node_ids(comfy)
    for warning in warnings:
        print(f"demo: warning: {warning}")
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="finetune-demo-"))
    with start_server(comfy, workdir, output_dir=comfy / "output") as server:
        print(f"demo: ComfyUI serving at {server.base_url} (log: {server.log_path})")
        check_pack_loaded(server, expected)
        client = ComfyClient(server.base_url)
        object_info = client.object_info()
        graph = to_api_graph(json.loads(WORKFLOW.read_text(encoding="utf-8")), object_info)
        prepare_graph(graph, object_info, checkpoint, quick=not real_checkpoint)
        with client.events() as events:
            prompt_id = client.submit(graph)
            print(f"demo: queued {WORKFLOW.name} as prompt {prompt_id}")
            result = wait_printing_progress(client, events, prompt_id, graph)
        if result.status != "success":
            where = f" in node {result.error.node_id} ({result.error.node_type})" if result.error else ""
            message = result.error.message if result.error else "no error message"
            raise DemoError(f"the workflow {result.status}{where}: {message}\n--- server log ---\n{server.log_tail()}")
        loras = newest_files(comfy / "models" / "loras", "*.safetensors", since=started)
        images = image_paths(result, server.output_dir)
    if not loras:
        raise DemoError(f"the workflow succeeded but wrote no LoRA into {comfy / 'models' / 'loras'}")
    print("demo: done.")
    print("  LoRA:   " + ", ".join(map(str, loras)))
    print("  images: " + (", ".join(map(str, images)) or "none saved"))
    return 0


def prepare_graph(graph: dict[str, Any], object_info: dict[str, Any], checkpoint: str, quick: bool) -> None:
    """Point the workflow at the sample images and the checkpoint; with the tiny checkpoint, shorten every loop."""
    ours = set(pack_nodes(object_info))
    pointed = 0
    for node in graph.values():
        specs = _input_specs(object_info[node["class_type"]])
        for name, value in list(node["inputs"].items()):
            kind, options = specs.get(name, (None, {}))
            if isinstance(value, list):
                continue  # a link
            if checkpoint in (kind if isinstance(kind, list) else options.get("options") or []):
                node["inputs"][name] = checkpoint
            elif node["class_type"] in ours and kind == "STRING" and any(w in name for w in FOLDER_WORDS) \
                    and "image" in (name + node["class_type"]).lower():
                node["inputs"][name] = str(SAMPLES)
                pointed += 1
            elif quick and kind == "INT":
                settings = QUICK_PACK_SETTINGS if node["class_type"] in ours else QUICK_STOCK_SETTINGS
                node["inputs"][name] = settings.get(name, value)
    if not pointed:
        raise DemoError(f"{WORKFLOW.name} has no image-folder input on the pack's dataset node to point at {SAMPLES}")


def _input_specs(info: dict[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    specs = {}
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            specs[name] = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return specs


def wait_printing_progress(client: ComfyClient, events: EventListener, prompt_id: str, graph: dict[str, Any]):
    """Print node starts, progress (at most once a second) and the pack's own events until the prompt ends."""
    deadline = time.monotonic() + TIMEOUT_S
    seen, last_print = 0, 0.0
    while time.monotonic() < deadline:
        for event in events.events[seen:]:
            seen += 1
            last_print = print_event(event, graph, last_print)
        entry = client.get(f"/history/{prompt_id}").json().get(prompt_id)
        if entry:
            return client.wait(prompt_id, timeout=5)
        time.sleep(0.5)
    client.interrupt(prompt_id)
    raise DemoError(f"the workflow did not finish within {TIMEOUT_S} s; interrupted it")


def print_event(event: dict[str, Any], graph: dict[str, Any], last_print: float) -> float:
    kind, data = event["type"], event.get("data", {})
    title = graph.get(str(data.get("node")), {}).get("_meta", {}).get("title", data.get("node"))
    if kind == "executing" and data.get("node"):
        print(f"demo: running {title}")
        return last_print
    frequent = kind == "progress" or kind.endswith("progress")
    if frequent and time.monotonic() - last_print < 1.0 and data.get("value") != data.get("max"):
        return last_print
    if kind == "progress":
        print(f"demo:   {title}: {data.get('value')}/{data.get('max')}")
    elif kind.startswith("finetune."):
        details = ", ".join(f"{k}={v}" for k, v in data.items() if isinstance(v, (int, float, str)) and k != "node")
        print(f"demo:   {kind}: {details}"[:200])
    return time.monotonic() if frequent else last_print


if __name__ == "__main__":
    sys.exit(main())
