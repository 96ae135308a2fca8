"""A real ComfyUI server with the pack: it loads completely, documents every input, runs a stock graph on the tiny
checkpoint, and still starts (with a clear line in its log) when an optional dependency is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.comfy import sample_workflows
from tests.comfy.client import image_paths
from tests.comfy.server import check_pack_loaded, expected_node_ids, hide_module, pack_nodes, server_env
from tests.comfy.workflow import to_api_graph

STOCK_TXT2IMG = Path(__file__).resolve().parent.parent / "comfy" / "fixtures" / "default_txt2img.json"
FRONTEND_QUEUE = "async (saved) => { await window.app.loadGraphData(saved); return (await window.app.graphToPrompt()).output; }"


def undocumented_inputs(info: dict) -> list[str]:
    missing = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not str(options.get("tooltip") or "").strip():
                missing.append(name)
    return missing


def test_every_node_of_the_pack_is_served_with_a_tooltip_on_every_input(comfy_server):
    nodes = pack_nodes(comfy_server.object_info())

    assert nodes, "no node of the pack in /object_info"
    assert {name: undocumented_inputs(info) for name, info in nodes.items() if undocumented_inputs(info)} == {}
    assert not [line for line in comfy_server.log_text().splitlines() if "IMPORT FAILED" in line]


def test_the_readme_node_reference_is_what_the_server_lists(comfy_server):
    import node_reference

    fresh = node_reference.updated_readme(comfy_server.object_info())
    assert fresh == node_reference.README.read_text(encoding="utf-8"), "run: python scripts/node_reference.py"


def test_stock_txt2img_graph_runs_on_the_tiny_checkpoint(comfy, comfy_server, tiny_checkpoint):
    graph = to_api_graph(json.loads(STOCK_TXT2IMG.read_text()), comfy.object_info())
    graph["4"]["inputs"]["ckpt_name"] = tiny_checkpoint
    graph["5"]["inputs"].update(width=64, height=64)
    graph["3"]["inputs"].update(steps=4, seed=1)
    graph["9"]["inputs"]["filename_prefix"] = "stock_txt2img"

    with comfy.events() as events:
        result = comfy.run(graph, timeout=300)

    assert result.status == "success", result.error
    [saved] = image_paths(result, comfy_server.output_dir)
    assert saved.name.startswith("stock_txt2img") and Image.open(saved).size == (64, 64)
    sampler_progress = [p for p in events.of_type("progress") if p["node"] == "3"]
    assert [p["value"] for p in sampler_progress][-1] == 4 and {p["max"] for p in sampler_progress} == {4}
    assert any(e["node"] == "9" and e["output"]["images"] for e in events.of_type("executed"))


def test_without_peft_the_server_starts_names_what_is_missing_and_serves_the_other_nodes(
        comfyui_dir, start_extra_server, tmp_path):
    no_peft = hide_module(tmp_path / "no_peft", "peft")
    all_nodes, _ = expected_node_ids(comfyui_dir)
    nodes_without_peft, _ = expected_node_ids(comfyui_dir, server_env(tmp_path, pythonpath_first=[no_peft]))

    server = start_extra_server(pythonpath_first=[no_peft])

    served = check_pack_loaded(server, nodes_without_peft)  # no IMPORT FAILED, every node that can load is there
    assert set(served) == nodes_without_peft
    assert nodes_without_peft < all_nodes, "hiding peft disabled no node: is peft really optional here?"
    log = server.log_text()
    peft_lines = [line for line in log.splitlines() if "peft" in line]
    assert len(peft_lines) == 1, peft_lines
    assert "comfyui-finetune" in peft_lines[0] and "pip install" in peft_lines[0]
    assert "Traceback" not in log


def whole_numbers_as_int(value):
    """JavaScript has one number type: 1.0 comes back as 1."""
    if isinstance(value, dict):
        return {k: whole_numbers_as_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers_as_int(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


@pytest.mark.browser
def test_the_converter_queues_what_the_frontend_itself_queues(comfy, comfy_page):
    object_info = comfy.object_info()
    for name, build in sample_workflows.CASES.items():
        saved = build()

        queued_by_frontend = comfy_page.page.evaluate(FRONTEND_QUEUE, saved)

        assert whole_numbers_as_int(to_api_graph(saved, object_info)) == whole_numbers_as_int(queued_by_frontend), name
