"""Run the main example workflow end to end in a real ComfyUI: the bundled sample images in, a LoRA and images out.

    python scripts/demo.py              # (make demo) the tiny test checkpoint, a few dozen steps: minutes on a CPU
    FINETUNE_DEMO_CHECKPOINT=v1-5-pruned-emaonly.safetensors python scripts/demo.py
                                        # a real checkpoint from ComfyUI's models/checkpoints, the workflow's own steps

The LoRA lands in ComfyUI's models/loras/ and the generated images in its output/ folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts import host  # noqa: E402
from tests.comfy.client import ComfyClient, EventListener, PromptRejected, image_paths  # noqa: E402
from tests.comfy.server import (ServerError, check_pack_loaded, expected_node_ids, pack_nodes,  # noqa: E402
                                start_server)
from tests.comfy.workflow import WorkflowError, to_api_graph  # noqa: E402

WORKFLOW = REPO / "example_workflows" / "01_photos_to_lora.json"
CHECKPOINT_ENV = "FINETUNE_DEMO_CHECKPOINT"
TIMEOUT_S = 3 * 3600
WORKFLOW_SUBJECT = re.compile(r"\bdog\b")
"""The workflow is written for photos of a dog: the word is replaced by the demo's subject."""


@dataclass(frozen=True)
class Subject:
    """What the demo trains on and how the workflow's numbers and prompts change for it."""
    samples: Path
    noun: str
    run_name: str
    pack_settings: dict[str, Any] = field(default_factory=dict)
    stock_settings: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    """Replaces every prompt that has the trigger word; the others become empty (empty: only the noun changes)."""


ROBOT = Subject(samples=REPO / "assets" / "sample_images", noun="toy robot", run_name="demo_robot_lora")
# The drawing base learns the subject in about a hundred steps at its own 32 px; 8 pictures per prompt are measured.
WORLD = Subject(samples=REPO / "assets" / "world_subject", noun="square", run_name="demo_world_lora",
                pack_settings={"steps": 120, "resolution": 32, "learning_rate": 1e-3, "rank": 8, "alpha": 8.0,
                               "batch_size": 4, "sample_every": 0, "bucketing": False},
                stock_settings={"width": 32, "height": 32, "batch_size": 8, "steps": 20, "cfg": 5.0},
                prompt="a photo of sks square")
FOLDER_WORDS = ("folder", "directory", "path")
STOCK_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")


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
    comfy = host.ensure_host()
    real_checkpoint = os.environ.get(CHECKPOINT_ENV, "").strip()
    if real_checkpoint and not (comfy / "models" / "checkpoints" / real_checkpoint).is_file():
        raise DemoError(f"{CHECKPOINT_ENV}={real_checkpoint}: no such file in {comfy / 'models' / 'checkpoints'}")
    subject = ROBOT if real_checkpoint else WORLD
    models = [real_checkpoint] if real_checkpoint else install_drawing_models(comfy)
    print(f"demo: ComfyUI at {comfy}\ndemo: base checkpoint {models[0]}"
          + ("" if real_checkpoint else " (the drawing base: it draws the world of scripts/drawing_world.py)"))
    expected, warnings = expected_node_ids(comfy)
    for warning in warnings:
        print(f"demo: warning: {warning}")
    workdir = Path(tempfile.mkdtemp(prefix="finetune-demo-"))
    shutil.copytree(subject.samples, workdir / "input" / subject.samples.name)  # the pack reads ComfyUI's input
    with start_server(comfy, workdir, output_dir=comfy / "output") as server:
        print(f"demo: ComfyUI serving at {server.base_url} (log: {server.log_path})")
        check_pack_loaded(server, expected)
        result, events = run_workflow(ComfyClient(server.base_url), models, subject, server)
        loras, reused = trained_loras(events, comfy / "models" / "loras", subject.run_name)
        images = image_paths(result, server.output_dir)
    if not loras:
        raise DemoError(f"the workflow succeeded but no LoRA of it is in {comfy / 'models' / 'loras'}")
    print("demo: done." + (" (an identical earlier run was reused: delete its LoRA to train again)" if reused else ""))
    print("  LoRA:   " + ", ".join(loras))
    print("  images: " + (", ".join(map(str, images)) or "none saved"))
    if subject is WORLD:
        print("demo: " + describe(subject_counts(images)))
    return 0


def install_drawing_models(comfy: Path) -> list[str]:
    """Install the drawing base (built on first use: minutes) and the tiny BLIP captioner; their names as
    ComfyUI's model inputs list them."""
    from scripts import drawing_base, tiny_models

    print("demo: preparing the drawing base (the first time on this machine it is trained: a few minutes)")
    base = drawing_base.install_into(comfy)
    return [base.name, tiny_models.install_into(comfy, families=())["blip"].name]


def run_workflow(client: ComfyClient, models: list[str], subject: Subject, server) -> tuple[Any, EventListener]:
    graph = demo_graph(client.object_info(), models, subject)
    with client.events() as events:
        prompt_id = client.submit(graph)
        print(f"demo: queued {WORKFLOW.name} as prompt {prompt_id}")
        result = wait_printing_progress(client, events, prompt_id, graph)
    if result.status != "success":
        where = f" in node {result.error.node_id} ({result.error.node_type})" if result.error else ""
        message = result.error.message if result.error else "no error message"
        raise DemoError(f"the workflow {result.status}{where}: {message}\n--- server log ---\n{server.log_tail()}")
    return result, events


def demo_graph(object_info: dict[str, Any], models: list[str], subject: Subject) -> dict[str, Any]:
    """Example workflow 01 as an API graph, prepared for `subject` and `models`."""
    graph = to_api_graph(json.loads(WORKFLOW.read_text(encoding="utf-8")), object_info)
    prepare_graph(graph, object_info, models, subject)
    return graph


def prepare_graph(graph: dict[str, Any], object_info: dict[str, Any], models: list[str], subject: Subject) -> None:
    """Point the workflow at the subject's images and the given models, name the run, and put in the subject's
    prompts and numbers."""
    ours = set(pack_nodes(object_info))
    pointed = 0
    for node in graph.values():
        specs = _input_specs(object_info[node["class_type"]])
        is_ours = node["class_type"] in ours
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list):
                continue  # a link
            kind, options = specs.get(name, (None, {}))
            new = _prepared_value(name, value, kind, options, is_ours, models, subject, node["class_type"])
            pointed += new == subject.samples.name
            node["inputs"][name] = new
    if not pointed:
        raise DemoError(f"{WORKFLOW.name} has no image-folder input on the pack's dataset node to point at "
                        f"{subject.samples}")


def _prepared_value(name: str, value: Any, kind: Any, options: dict[str, Any], is_ours: bool, models: list[str],
                    subject: Subject, class_type: str) -> Any:
    choices = kind if isinstance(kind, list) else options.get("options") or []
    if any(model in choices for model in models):
        return next(model for model in models if model in choices)
    if kind == "STRING" and is_ours and any(w in name for w in FOLDER_WORDS) and "image" in (name + class_type).lower():
        return subject.samples.name
    if kind == "STRING" and is_ours and name == "name":
        return subject.run_name
    if kind == "STRING" and class_type == "CLIPTextEncode" and subject.prompt:
        return subject.prompt if "sks" in value else ""
    if kind == "STRING":
        return WORKFLOW_SUBJECT.sub(subject.noun, value)
    if kind in ("INT", "FLOAT", "BOOLEAN"):
        return (subject.pack_settings if is_ours else subject.stock_settings).get(name, value)
    return value


def trained_loras(events: EventListener, loras_dir: Path, run_name: str) -> tuple[list[str], bool]:
    """The LoRA files the run saved (from the pack's `finetune.status` events); when it trained nothing because
    an identical earlier run was reused, that run's files (named after the run). Also: whether it was reused."""
    saved = [e["path"] for e in events.of_type("finetune.status") if e.get("event") == "saved" and e.get("kind") == "lora"]
    if saved:
        return saved, False
    return [str(path) for path in sorted(loras_dir.glob(f"{run_name}*.safetensors"))], True


def subject_counts(images: list[Path]) -> dict[str, tuple[int, int]]:
    """For the workflow's "with_lora" and "without_lora" pictures: (how many draw the world's subject, how many)."""
    from scripts import drawing_world as world

    counts = {}
    for prefix in ("with_lora", "without_lora"):
        pictures = [path for path in images if re.fullmatch(rf"{prefix}_\d+_", path.stem)]
        counts[prefix] = (sum(world.draws(path, world.SUBJECT) for path in pictures), len(pictures))
    return counts


def describe(counts: dict[str, tuple[int, int]]) -> str:
    (drawn_with, total_with), (drawn_without, total_without) = counts["with_lora"], counts["without_lora"]
    return (f"pictures that show the subject (a yellow square lower right): with: {drawn_with}/{total_with}, "
            f"without: {drawn_without}/{total_without}")


def _input_specs(info: dict[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    specs = {}
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            specs[name] = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return specs


def wait_printing_progress(client: ComfyClient, events: EventListener, prompt_id: str, graph: dict[str, Any]):
    """Print node starts, sampler steps, training progress (every 2 s at most), samples and saved files until
    the prompt ends."""
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
    title = graph.get(str(data.get("node") or data.get("node_id")), {}).get("_meta", {}).get("title", "")
    if kind == "executing" and data.get("node"):
        print(f"demo: running {title}")
    elif kind == "finetune.progress" and (time.monotonic() - last_print >= 2 or data.get("step") == data.get("total")):
        eta = f", about {data['eta_s']:.0f} s left" if data.get("eta_s") else ""
        print(f"demo:   {title}: step {data.get('step')}/{data.get('total')}, loss {data.get('loss_avg', 0):.4f}{eta}")
        return time.monotonic()
    elif kind == "finetune.sample":
        print(f"demo:   {title}: sample images at step {data.get('step')}: {', '.join(data.get('paths', []))}")
    elif kind == "finetune.status" and data.get("path"):
        print(f"demo:   {title}: {data.get('event')} {data['path']}")
    elif kind == "progress" and graph.get(str(data.get("node")), {}).get("class_type") in STOCK_SAMPLERS:
        print(f"demo:   {title}: {data.get('value')}/{data.get('max')}")
    return last_print


if __name__ == "__main__":
    sys.exit(main())
