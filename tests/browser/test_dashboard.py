"""The dashboard in a real browser (Debian's Chromium, headless) on a real ComfyUI server: the extension loads
cleanly, Train LoRA comes from the node search with its progress widget, a queued training shows its loss chart,
steps, samples and memory plan live, is cancelled from the Fine-tunes sidebar, and is shown again after the page reloads.

Screenshots land in output/browser-screenshots/; FINETUNE_UPDATE_DOCS_SCREENSHOT=1 also copies the sidebar one to
docs/dashboard.png (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from tests.browser.dashboard_page import (EXTENSION_NAME, TAB_BUTTON, add_node_from_search, build_training_graph,
                                          clear_graph, dismiss_banner, errors_from_us, node_types, open_sidebar,
                                          queue, run_card, save_screenshot, wait_for_widget)
from tests.comfy.browser import APP_READY, READY_TIMEOUT_MS
from tests.comfy.training import TINY_RUN

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
START_TIMEOUT_S = 300  # loading the base model in the trainer process, on a busy 2-core machine
STOP_TIMEOUT_S = 180  # the trainer saves a checkpoint before it stops


def test_the_page_loads_our_extension_without_errors_from_it(comfy_page):
    page = comfy_page.page

    assert page.evaluate("(name) => app.extensions.some((e) => e.name === name)", EXTENSION_NAME)
    assert page.locator(TAB_BUTTON).is_visible()
    assert errors_from_us(comfy_page) == []


def test_train_lora_comes_from_the_node_search_with_its_progress_widget(comfy_page):
    page = comfy_page.page
    clear_graph(page)

    add_node_from_search(page, "finetune train lora", first_match="Train LoRA")

    assert node_types(page) == ["FinetuneTrainLoRA"]
    widget = page.locator(".finetune-progress")
    widget.wait_for(state="visible")
    assert "Queue the workflow to train" in widget.inner_text()
    queued_inputs = page.evaluate("async () => Object.values((await app.graphToPrompt()).output)[0].inputs")
    assert "finetune_progress" not in queued_inputs and queued_inputs["rank"] == 16
    assert errors_from_us(comfy_page) == []


def test_a_training_is_watched_live_cancelled_from_the_sidebar_and_shown_after_a_reload(
        comfy_page, comfy, tiny_checkpoint, training_images, screenshots):
    page = comfy_page.page
    dismiss_banner(page)
    node_id = build_training_graph(
        page,
        images={"path": training_images, "resolution": 64, "bucketing": False},
        training={"base_checkpoint": tiny_checkpoint, "trigger_word": "sks", "class_noun": "robot", "steps": 400,
                  "learning_rate": 1e-4, "rank": 4, "alpha": 4.0, "seed": 11, "name": f"browser_{uuid.uuid4().hex[:6]}",
                  "sample_prompts": "a photo of {trigger} {class}", "sample_every": 2, "advanced": TINY_RUN})

    queue(page)

    first = wait_for_widget(page, node_id, "w.status === 'running' && w.step >= 1 && w.chart_drawn", START_TIMEOUT_S)
    later = wait_for_widget(page, node_id, f"w.step > {first['step']} && w.samples_loaded > 0", START_TIMEOUT_S)
    assert later["run_id"] == first["run_id"] and later["chart_drawn"]
    save_screenshot(page, screenshots, "training_node")

    panel = open_sidebar(page)
    card = run_card(page, later["run_id"])
    card.locator(".finetune-run-header").click()
    card.locator(".finetune-chart").wait_for(state="visible")
    card.locator(".finetune-samples img").first.wait_for(state="visible")
    # the plan event's memory plan: on a CPU no GPU memory to fit, so no budget after the estimate
    memory = card.locator(".finetune-run-memory").inner_text()
    assert re.fullmatch(r"Memory \(auto\): [a-z_, ]+; estimate \d+\.\d GiB", memory), memory
    dashboard = save_screenshot(page, screenshots, "dashboard")
    if os.environ.get("FINETUNE_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copy(dashboard, DOCS_SCREENSHOT)

    card.locator("[data-action=cancel]").click()

    page.wait_for_function("(el) => el.dataset.status === 'cancelled'", arg=card.element_handle(),
                           timeout=STOP_TIMEOUT_S * 1000)
    stopped = wait_for_widget(page, node_id, "w.status === 'cancelled'", 30)
    assert panel.locator(f'.finetune-run[data-run-id="{later["run_id"]}"] [data-action=resume]').is_visible()
    assert comfy.get(f"/finetune/runs/{later['run_id']}").json()["run"]["status"] == "cancelled"
    save_screenshot(page, screenshots, "cancelled")

    page.reload(wait_until="domcontentloaded")
    page.wait_for_function(APP_READY, timeout=READY_TIMEOUT_MS)
    again = wait_for_widget(page, node_id, "w.status === 'cancelled' && w.chart_drawn", 60)
    assert again["run_id"] == later["run_id"] and again["step"] == stopped["step"] >= later["step"]
    save_screenshot(page, screenshots, "after_reload")
    assert errors_from_us(comfy_page) == []
