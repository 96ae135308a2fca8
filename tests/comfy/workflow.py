"""Turn a workflow saved by ComfyUI's frontend (nodes, links, widgets_values) into the API graph `POST /prompt`
takes, following the frontend's own "Queue" step: widget values are matched to input names through
`/object_info`, Reroutes are followed, PrimitiveNodes give their value, muted nodes are left out and
bypassed nodes are passed through. A widget the node gained after the workflow was saved (newer ComfyUI, e.g.
`resolution_steps` of ImageScaleToTotalPixels in 0.33) gets its default, as the frontend gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MUTED = 2
BYPASSED = 4
# Nodes that exist only in the editor: they never run on the server.
VIRTUAL_NODES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Combo options that make the frontend add an "upload" button widget, which takes a slot in widgets_values.
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")
MAX_HOPS = 1000


class WorkflowError(ValueError):
    """The workflow cannot be converted; the message names the node."""


@dataclass(frozen=True)
class Constant:
    """A value that reaches an input from a PrimitiveNode instead of another node's output."""

    value: Any


Source = tuple[str, int]  # (node id, output slot) as the API graph writes a link


def to_api_graph(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API-format graph of `workflow`; `object_info` is the server's `/object_info` (or a subset with every
    node type the workflow uses)."""
    graph = _Workflow(workflow)
    api: dict[str, dict[str, Any]] = {}
    for node in graph.nodes.values():
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node['id']} is of type {node['type']!r}, which this ComfyUI does not know "
                                "(a custom node pack that is not installed?)")
        inputs = widget_inputs(node, info)
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            name = (slot.get("widget") or {}).get("name") or slot["name"]
            source = graph.resolve(slot["link"])
            if source is None:
                inputs.pop(name, None)
            elif isinstance(source, Constant):
                inputs[name] = _wrap(source.value)
            else:
                inputs[name] = [source[0], source[1]]
        title = node.get("title") or info.get("display_name") or node["type"]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    return api


def widget_inputs(node: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The node's widget values by input name."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):
        known = set(widget_slots(info))
        return {name: _wrap(value) for name, value in values.items() if name in known}
    inputs: dict[str, Any] = {}
    slots = widget_slots(info)
    for name, value in zip(slots, values):
        if name is not None:
            _check_value_type(node, info, name, value)
            inputs[name] = _wrap(value)
    for name in slots[len(values):]:
        default = _default(info, name) if name is not None else None
        if default is not None:
            inputs[name] = _wrap(default)
    return inputs


def _default(info: dict[str, Any], name: str) -> Any:
    """The value the frontend gives a new widget: the input's default, or a combo's first option."""
    kind, options = next((k, o) for n, k, o in _input_specs(info) if n == name)
    if "default" in options:
        return options["default"]
    choices = kind if isinstance(kind, list) else options.get("options") if _is_combo(kind) else None
    return choices[0] if choices else None


def widget_slots(info: dict[str, Any]) -> list[str | None]:
    """Input names in `widgets_values` order; None for a slot the frontend adds for itself (a "control after
    generate" choice, a combo's filter, an upload button)."""
    slots: list[str | None] = []
    for name, kind, options in _input_specs(info):
        if options.get("forceInput") or not _is_widget_type(kind):
            continue
        slots.append(name)
        slots.extend([None] * _helper_widget_count(name, kind, options))
    return slots


def _helper_widget_count(name: str, kind: Any, options: dict[str, Any]) -> int:
    if kind == "INT":
        control = options.get("control_after_generate")
        return 1 if (name in SEED_NAMES if control is None else control) else 0
    if _is_combo(kind):
        count = 2 if options.get("control_after_generate") else 0  # the control choice and its filter text
        return count + (1 if any(options.get(flag) for flag in UPLOAD_FLAGS) else 0)
    return 0


def _input_specs(info: dict[str, Any]):
    """(name, type, options) of every input in the order the frontend builds widgets."""
    for section in ("required", "optional"):
        specs = (info.get("input") or {}).get(section) or {}
        order = (info.get("input_order") or {}).get(section) or list(specs)
        for name in order:
            spec = specs[name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            yield name, spec[0], options


def _is_widget_type(kind: Any) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _is_combo(kind: Any) -> bool:
    return isinstance(kind, list) or kind == "COMBO"


def _check_value_type(node: dict[str, Any], info: dict[str, Any], name: str, value: Any) -> None:
    """Catch widgets_values that no longer line up with the node's inputs (a node whose inputs changed since the
    workflow was saved) instead of sending shifted values."""
    kind = next(k for n, k, _ in _input_specs(info) if n == name)
    if not isinstance(kind, str):
        return
    expected = {"INT": (int, float), "FLOAT": (int, float), "BOOLEAN": (bool,), "STRING": (str,)}.get(kind)
    is_bool_for_number = kind in ("INT", "FLOAT") and isinstance(value, bool)
    if expected and (is_bool_for_number or not isinstance(value, expected)) and value is not None:
        raise WorkflowError(f"node {node['id']} ({node['type']}): widget {name!r} expects {kind} but the saved value "
                            f"is {value!r}; the workflow does not match this version of the node")


def _wrap(value: Any) -> Any:
    # A list value would read as a link [node, slot]; the frontend sends it wrapped the same way.
    return {"__value__": value} if isinstance(value, list) else value


class _Workflow:
    def __init__(self, workflow: dict[str, Any]):
        if not isinstance(workflow.get("nodes"), list):
            raise WorkflowError("not a saved ComfyUI workflow: no 'nodes' list (an API-format graph needs no converting)")
        self.nodes = {str(node["id"]): node for node in workflow["nodes"]}
        self.links = dict(_parse_link(link) for link in workflow.get("links") or [])
        subgraphs = {sub.get("id") for sub in (workflow.get("definitions") or {}).get("subgraphs") or []}
        for node in self.nodes.values():
            if node["type"] in subgraphs:
                raise WorkflowError(f"node {node['id']} is a subgraph; unpack it in ComfyUI (right-click, "
                                    "Unpack Subgraph) and save again")

    def resolve(self, link_id: int) -> Source | Constant | None:
        """Where the value on a link really comes from, or None when nothing reaches it (a muted node, a dangling
        Reroute, a bypassed node with no matching input)."""
        for _ in range(MAX_HOPS):
            if link_id not in self.links:
                raise WorkflowError(f"link {link_id} is used by a node but missing from the workflow's links")
            origin_id, origin_slot, kind = self.links[link_id]
            node = self.nodes.get(origin_id)
            if node is None:
                raise WorkflowError(f"link {link_id} starts at node {origin_id}, which is not in the workflow")
            if node["type"] == "PrimitiveNode":
                return Constant((node.get("widgets_values") or [None])[0])
            if node["type"] == "Reroute":
                upstream = (node.get("inputs") or [{}])[0].get("link")
            elif node.get("mode", 0) == BYPASSED:
                upstream = _bypass_input_link(node, origin_slot, kind)
            elif node.get("mode", 0) == MUTED:
                return None
            else:
                return origin_id, origin_slot
            if upstream is None:
                return None
            link_id = upstream
        raise WorkflowError(f"link {link_id}: the Reroutes and bypassed nodes form a loop")


def _parse_link(link: Any) -> tuple[int, tuple[str, int, str]]:
    if isinstance(link, dict):
        return link["id"], (str(link["origin_id"]), int(link["origin_slot"]), str(link.get("type", "*")))
    link_id, origin_id, origin_slot, _target_id, _target_slot, kind = link[:6]
    return link_id, (str(origin_id), int(origin_slot), str(kind))


def _bypass_input_link(node: dict[str, Any], slot: int, kind: str) -> int | None:
    """The input link a bypassed node passes through to output `slot`, chosen as the frontend chooses it."""
    inputs = node.get("inputs") or []
    if not inputs:
        return None
    outputs = node.get("outputs") or []
    output_type = str(outputs[slot].get("type", "*")) if slot < len(outputs) else "*"
    if kind in ("*", ""):
        index = slot if slot < len(inputs) else 0
    elif slot < len(inputs) and _compatible(inputs[slot]["type"], output_type) and _compatible(inputs[slot]["type"], kind):
        index = slot
    else:
        index = next((i for i, inp in enumerate(inputs) if inp["type"] == kind), None)
        if index is None:
            index = next((i for i, inp in enumerate(inputs)
                          if _compatible(inp["type"], output_type) and _compatible(inp["type"], kind)), None)
    return None if index is None else inputs[index].get("link")


def _compatible(a: Any, b: Any) -> bool:
    a, b = str(a).upper(), str(b).upper()
    if a == b or "*" in (a, b) or "" in (a, b):
        return True
    return bool(set(a.split(",")) & set(b.split(",")))
