"""The API graph that started a run, kept in its folder (`prompt.json`) so that Resume still works after ComfyUI
restarts. Written once, when the run starts; the dashboard's routes only read it."""

from __future__ import annotations

import json
from typing import Any

from ..trainers.io import atomic_write_text
from .runs import RunRecord, RunStore

PROMPT_FILE = "prompt.json"


def load_prompt(store: RunStore, record: RunRecord) -> dict[str, Any] | None:
    """{"prompt", "extra_data"} of the workflow that started the run: kept in its folder, else ComfyUI's queue or
    history."""
    try:
        saved = json.loads((store.run_dir(record.id) / PROMPT_FILE).read_text(encoding="utf-8"))
        if isinstance(saved, dict) and isinstance(saved.get("prompt"), dict):
            return saved
    except (OSError, ValueError):
        pass
    return prompt_known_to_comfyui(record.prompt_id)


def remember_prompt(store: RunStore, record: RunRecord) -> None:
    """Keep the run's API graph in its folder while ComfyUI still knows it."""
    path = store.run_dir(record.id) / PROMPT_FILE
    if record.status == "succeeded" or path.exists():
        return
    found = prompt_known_to_comfyui(record.prompt_id)
    if found is not None:
        atomic_write_text(path, json.dumps(found, default=str) + "\n")


def prompt_known_to_comfyui(prompt_id: str) -> dict[str, Any] | None:
    if not prompt_id:
        return None
    from server import PromptServer

    queue = PromptServer.instance.prompt_queue
    running, pending = queue.get_current_queue_volatile()
    items = [*running, *pending]
    entry = queue.get_history(prompt_id=prompt_id).get(prompt_id)
    if entry is not None:
        items.append(entry["prompt"])
    # a queue item is (number, prompt_id, prompt, extra_data, outputs_to_execute, ...)
    item = next((item for item in items if item[1] == prompt_id), None)
    if item is None:
        return None
    extra = {k: v for k, v in (item[3] or {}).items() if k not in ("client_id", "create_time")}
    return {"prompt": item[2], "extra_data": extra}
