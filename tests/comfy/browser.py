"""A real Chromium (Debian's, driven by playwright's bundled driver — nothing is downloaded) on ComfyUI's page."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
READY_TIMEOUT_MS = 60_000
# The frontend sets window.app once the graph canvas exists and the node definitions are registered.
APP_READY = "() => Boolean(window.app && window.app.graph && window.app.canvas && window.LiteGraph)"
# Then, asynchronously, the frontend loads the startup workflow (the default graph on a fresh page, since the test
# servers' settings mark the tutorial done): a test that clears or loads a graph before that would see it
# replaced. Frontend 1.49 takes long enough for that to happen.
STARTUP_GRAPH_LOADED = "() => window.app.graph.nodes.length > 0"


def chromium_path() -> str | None:
    configured = os.environ.get("CHROMIUM_PATH")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    if chromium_path() is None:
        return ("NO CHROMIUM: browser tests skipped. Install Debian's chromium and chromium-driver "
                "(bash scripts/setup.sh does it with apt-get) or set CHROMIUM_PATH.")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "NO PLAYWRIGHT: browser tests skipped. pip install -r scripts/requirements-dev.txt"
    return None


@contextmanager
def launch_chromium() -> Iterator[Any]:
    """A headless Chromium browser (playwright Browser), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class ComfyPage:
    """ComfyUI's page in its own browser context, with every console message and page error it produced."""

    page: Any
    console: list[tuple[str, str]] = field(default_factory=list)
    """(type, text) of each console message: "log", "warning", "error", ..."""
    page_errors: list[str] = field(default_factory=list)

    def errors_mentioning(self, *needles: str) -> list[str]:
        """Console errors and uncaught page errors whose text contains any of `needles` (case-insensitive).
        ComfyUI itself logs a few errors offline (missing user.css, registry look-ups): filter, don't count."""
        errors = [text for kind, text in self.console if kind == "error"] + self.page_errors
        return [text for text in errors if any(needle.lower() in text.lower() for needle in needles)]

    def close(self) -> None:
        self.page.context.close()


def open_comfy(browser: Any, base_url: str, viewport: tuple[int, int] = (1400, 900)) -> ComfyPage:
    """Open ComfyUI in a fresh context and wait until its app is ready."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = context.new_page()
    comfy = ComfyPage(page)
    page.on("console", lambda message: comfy.console.append((message.type, message.text)))
    page.on("pageerror", lambda error: comfy.page_errors.append(str(error)))
    page.goto(base_url, wait_until="domcontentloaded")
    page.wait_for_function(APP_READY, timeout=READY_TIMEOUT_MS)
    page.wait_for_function(STARTUP_GRAPH_LOADED, timeout=READY_TIMEOUT_MS)
    return comfy
