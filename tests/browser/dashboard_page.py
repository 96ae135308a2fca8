"""What the browser tests do on ComfyUI's page, in the user's terms: add a node from the search, build and queue a
training graph, read a Train node's progress widget, open the Fine-tunes sidebar and act on a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TAB_BUTTON = ".finetune-runs-tab-button"
EXTENSION_NAME = "comfyui-finetune.dashboard"
TIMEOUT_MS = 30_000
OUR_NAMES = ("finetune", "/extensions/comfyui-finetune")
OFFLINE_REGISTRY = "api.comfy.org"

# Builds LoadTrainingImages -> Train LoRA with the frontend's own node classes, then reloads the graph from its
# saved form through app.loadGraphData, as opening a workflow file does. Returns the Train node's id.
_BUILD_TRAINING_GRAPH = """async ({images, training}) => {
  const make = (type, pos, values) => {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error(`no node type ${type}`);
    node.pos = pos;
    app.graph.add(node);
    for (const [name, value] of Object.entries(values)) {
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(`${type} has no widget ${name}`);
      widget.value = value;
    }
    return node;
  };
  app.graph.clear();
  const load = make("FinetuneLoadTrainingImages", [40, 120], images);
  const train = make("FinetuneTrainLoRA", [load.pos[0] + load.size[0] + 60, 60], training);
  load.connect(0, train, train.inputs.findIndex((input) => input.name === "dataset"));
  const saved = app.graph.serialize();
  await app.loadGraphData(saved);
  return train.id;
}"""


def errors_from_us(comfy_page: Any) -> list[str]:
    """Console and page errors that name our extension or nodes. The frontend's own look-ups of our node types in
    the registry name them too, but they are the frontend's (blocked offline), not ours."""
    return [text for text in comfy_page.errors_mentioning(*OUR_NAMES) if OFFLINE_REGISTRY not in text]


# The node search box's text input and its highlighted match, in each frontend the tests run against: the
# PrimeVue box (1.32, and 1.49 with Comfy.NodeSearchBoxImpl "v1 (legacy)") and the 1.49 default box.
SEARCH_INPUT = ".comfy-vue-node-search-box input, input[role=combobox][aria-controls=results-list]"
SEARCH_MATCH = ".p-autocomplete-option.p-focus, [data-testid=result-item][aria-selected=true]"
SEARCH_OPEN_TIMEOUT_MS = 5_000
DOUBLE_CLICK_TRIES = 2
TOGGLE_SEARCH = "() => app.extensionManager.command.execute('Workspace.SearchBox.Toggle')"


def add_node_from_search(page: Any, query: str, first_match: str) -> None:
    """Open the node search, type into it and, once the highlighted match reads `first_match`, take it with
    Enter."""
    search = open_node_search(page)
    search.fill(query)
    page.locator(SEARCH_MATCH, has_text=first_match).first.wait_for(state="visible", timeout=TIMEOUT_MS)
    page.keyboard.press("Enter")


def open_node_search(page: Any) -> Any:
    """Open the node search as a user does, with a double-click on an empty spot of the canvas; returns its input.
    On a busy machine the canvas can draw a frame in seconds, and the two clicks then arrive too far apart to be a
    double-click: after a second try, the frontend's own command for the search box (its keyboard shortcut) opens
    the same box."""
    canvas = page.locator("#graph-canvas")
    search = page.locator(SEARCH_INPUT).first
    for attempt in range(DOUBLE_CLICK_TRIES + 1):
        if attempt < DOUBLE_CLICK_TRIES:
            box = canvas.bounding_box()
            page.mouse.dblclick(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6)
        else:
            page.evaluate(TOGGLE_SEARCH)
        if _shows(search, SEARCH_OPEN_TIMEOUT_MS):
            return search
    raise AssertionError(f"no node search box ({SEARCH_INPUT}) after {DOUBLE_CLICK_TRIES} double-clicks on the "
                         "canvas and the Workspace.SearchBox.Toggle command")


def _shows(locator: Any, timeout_ms: int) -> bool:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.wait_for(state="visible", timeout=timeout_ms)
        return True
    except PlaywrightTimeout:
        return False


def node_types(page: Any) -> list[str]:
    return page.evaluate("() => app.graph.nodes.map((node) => node.type)")


def clear_graph(page: Any) -> None:
    page.evaluate("() => { app.graph.clear(); app.graph.setDirtyCanvas(true, true); }")


def build_training_graph(page: Any, images: dict[str, Any], training: dict[str, Any]) -> str:
    return str(page.evaluate(_BUILD_TRAINING_GRAPH, {"images": images, "training": training}))


def queue(page: Any) -> None:
    page.evaluate("() => app.queuePrompt(0, 1)")


# Whether the loss chart drew lines, not only its frame: enough strongly coloured pixels on the canvas.
_CHART_DRAWN = """(canvas) => {
  if (!canvas || !canvas.width) return false;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let coloured = 0;
  for (let i = 0; i < data.length; i += 4) {
    const spread = Math.max(data[i], data[i + 1], data[i + 2]) - Math.min(data[i], data[i + 1], data[i + 2]);
    if (data[i + 3] > 0 && spread > 60) coloured++;
  }
  return coloured > 20;
}"""

# What a Train node's progress widget shows (node.finetuneView is the widget's view), or null without one.
_WIDGET_STATE = f"""(id) => {{
  const view = app.graph.getNodeById(Number(id))?.finetuneView?.element;
  if (!view) return null;
  const stepText = view.querySelector('[data-field=step]')?.textContent ?? '';
  const images = [...view.querySelectorAll('.finetune-samples img')];
  return {{
    run_id: view.dataset.runId,
    status: view.dataset.status,
    step: Number((/step (\\d+)/.exec(stepText) ?? [0, 0])[1]),
    chart_drawn: ({_CHART_DRAWN})(view.querySelector('canvas')),
    samples_loaded: images.filter((img) => img.complete && img.naturalWidth > 0).length,
  }};
}}"""


def widget_state(page: Any, node_id: str) -> dict[str, Any] | None:
    """{run_id, status, step, chart_drawn, samples_loaded} of the node's progress widget."""
    return page.evaluate(_WIDGET_STATE, node_id)


def wait_for_widget(page: Any, node_id: str, condition: str, timeout_s: float) -> dict[str, Any]:
    """Wait until `condition`, a JS expression over `w` (the widget_state), holds; returns the state."""
    page.wait_for_function(f"(id) => {{ const w = ({_WIDGET_STATE})(id); return Boolean(w && ({condition})); }}",
                           arg=node_id, timeout=timeout_s * 1000, polling=250)
    return widget_state(page, node_id)


def open_sidebar(page: Any) -> Any:
    """Open the Fine-tunes tab; returns its panel."""
    page.locator(TAB_BUTTON).click()
    panel = page.locator(".finetune-panel")
    panel.wait_for(state="visible", timeout=TIMEOUT_MS)
    return panel


def run_card(page: Any, run_id: str) -> Any:
    return page.locator(f'.finetune-run[data-run-id="{run_id}"]')


def dismiss_banner(page: Any) -> None:
    """Close the frontend's own announcement banner, if it shows one, so that screenshots show the graph."""
    close = page.locator("div:has(> div > span:has-text('Introducing Nodes 2.0')) > button:has(i[class*='lucide--x'])")
    if close.count():
        close.first.click()


def save_screenshot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    return path
