"""Small saved workflows (the frontend's format) that exercise the converter's tricky cases, built from stock nodes.
The unit tests check the converter on them; an integration test checks the real frontend agrees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .workflow import BYPASSED, MUTED

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def node(node_id: int, kind: str, widgets: Any = None, inputs=(), outputs=(), mode: int = 0,
         title: str | None = None) -> dict[str, Any]:
    """A saved node: inputs are (name, type, link) or (name, type, link, widget name) tuples."""
    saved: dict[str, Any] = {
        "id": node_id, "type": kind, "mode": mode,
        "inputs": [{"name": i[0], "type": i[1], "link": i[2], **({"widget": {"name": i[3]}} if len(i) > 3 else {})}
                   for i in inputs],
        "outputs": [{"name": o, "type": o, "links": []} for o in outputs],
    }
    if widgets is not None:
        saved["widgets_values"] = widgets
    if title:
        saved["title"] = title
    return saved


def workflow(*nodes: dict[str, Any], links=()) -> dict[str, Any]:
    """A saved workflow from nodes and (id, origin, origin slot, target, target slot, type) links; like the
    frontend, each output lists the links leaving it."""
    by_id = {n["id"]: n for n in nodes}
    for link_id, origin, slot, *_ in links:
        by_id[origin]["outputs"][slot]["links"].append(link_id)
    return {"nodes": list(nodes), "links": [list(link) for link in links], "version": 0.4}


def checkpoint() -> dict[str, Any]:
    return node(1, "CheckpointLoaderSimple", ["tiny.safetensors"], outputs=("MODEL", "CLIP", "VAE"))


def ksampler(node_id: int = 3, model_link: int = 10, seed: int = 7, extra_inputs=()) -> dict[str, Any]:
    return node(node_id, "KSampler", [seed, "randomize", 4, 6.5, "euler", "normal", 1.0],
                inputs=(("model", "MODEL", model_link), *extra_inputs))


def lora_between_checkpoint_and_sampler(lora_mode: int = 0) -> dict[str, Any]:
    lora = node(2, "LoraLoader", ["style.safetensors", 0.8, 1.0], mode=lora_mode,
                inputs=(("model", "MODEL", 10), ("clip", "CLIP", 11)), outputs=("MODEL", "CLIP"))
    text = node(4, "CLIPTextEncode", ["a toy robot"], inputs=(("clip", "CLIP", 13),))
    return workflow(checkpoint(), lora, ksampler(model_link=12), text, links=[
        (10, 1, 0, 2, 0, "MODEL"), (11, 1, 1, 2, 1, "CLIP"), (12, 2, 0, 3, 0, "MODEL"), (13, 2, 1, 4, 0, "CLIP")])


def seed_from_primitive_node() -> dict[str, Any]:
    return workflow(checkpoint(), node(5, "PrimitiveNode", [1234, "fixed"], outputs=("INT",)),
                    ksampler(seed=7, extra_inputs=(("seed", "INT", 11, "seed"),)),
                    links=[(10, 1, 0, 3, 0, "MODEL"), (11, 5, 0, 3, 1, "INT")])


def seed_from_v3_primitive_int() -> dict[str, Any]:
    return workflow(checkpoint(), node(5, "PrimitiveInt", [77, "increment"], outputs=("INT",)),
                    ksampler(extra_inputs=(("seed", "INT", 11, "seed"),)),
                    links=[(10, 1, 0, 3, 0, "MODEL"), (11, 5, 0, 3, 1, "INT")])


def model_through_two_reroutes() -> dict[str, Any]:
    return workflow(checkpoint(), node(20, "Reroute", inputs=(("", "*", 10),), outputs=("MODEL",)),
                    node(21, "Reroute", inputs=(("", "*", 11),), outputs=("MODEL",)), ksampler(model_link=12),
                    links=[(10, 1, 0, 20, 0, "MODEL"), (11, 20, 0, 21, 0, "MODEL"), (12, 21, 0, 3, 0, "MODEL")])


def ksampler_advanced() -> dict[str, Any]:
    values = ["enable", 99, "fixed", 12, 5.0, "ddim", "karras", 2, 10, "disable"]
    return workflow(checkpoint(), node(2, "KSamplerAdvanced", values, inputs=(("model", "MODEL", 10),)),
                    links=[(10, 1, 0, 2, 0, "MODEL")])


def force_input_socket() -> dict[str, Any]:
    return workflow(node(2, "CreateHookKeyframesFromFloats", [0.1, 0.9, True]))


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "stock default": lambda: load_fixture("default_txt2img.json"),
    "stock image2image": lambda: load_fixture("image2image.json"),
    "active lora": lambda: lora_between_checkpoint_and_sampler(0),
    "muted lora": lambda: lora_between_checkpoint_and_sampler(MUTED),
    "bypassed lora": lambda: lora_between_checkpoint_and_sampler(BYPASSED),
    "primitive node": seed_from_primitive_node,
    "v3 primitive": seed_from_v3_primitive_int,
    "reroutes": model_through_two_reroutes,
    "ksampler advanced": ksampler_advanced,
    "forceInput": force_input_socket,
}
"""Every sample, by name: workflows a current frontend could have saved."""
