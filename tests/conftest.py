"""Fixtures shared by every test: a real ComfyUI server with the pack (one per session), a client for it, extra
servers on demand, and a real Chromium for browser tests. Tests under tests/integration and tests/browser get the
`integration` / `browser` / `pictures` marker from their folder."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path

import pytest

from tests.comfy.browser import browser_missing, launch_chromium, open_comfy
from tests.comfy.client import ComfyClient
from tests.comfy.server import (ServerError, check_pack_loaded, expected_node_ids, prepare_host, start_server,
                               tiny_checkpoint_name)

TESTS = Path(__file__).resolve().parent
MARKED_FOLDERS = ("integration", "pictures", "browser")  # each folder's tests get the marker of the same name
RUN_ORDER = ("unit", "integration", "pictures", "browser")
HF_HOME_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # Nothing in a test may reach the model hub, or read a stray accelerate/hub config from the user's home.
    config.stash[HF_HOME_KEY] = tempfile.mkdtemp(prefix="finetune-hf-home-")
    os.environ["HF_HOME"] = config.stash[HF_HOME_KEY]
    os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_unconfigure(config: pytest.Config) -> None:
    if HF_HOME_KEY in config.stash:
        shutil.rmtree(config.stash[HF_HOME_KEY], ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _folder(item) in MARKED_FOLDERS:
            item.add_marker(_folder(item))
    # Quick feedback first: unit tests, then the real server, then the browser.
    items.sort(key=lambda item: RUN_ORDER.index(_folder(item)) if _folder(item) in RUN_ORDER else len(RUN_ORDER))


def _folder(item: pytest.Item) -> str:
    path = Path(item.path)
    return path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else ""


@pytest.fixture(autouse=True)
def _server_left_idle(request: pytest.FixtureRequest):
    """After a test that used the session's server, nothing it queued keeps running into the next test."""
    yield
    server = request.node.funcargs.get("comfy_server")
    if server is not None and not ComfyClient(server.base_url).settle():
        warnings.warn(f"{request.node.nodeid} left a prompt running on the session's server that did not stop")


@pytest.fixture(scope="session")
def runs():
    """`nodes/runs.py` imported as ComfyUI imports it, inside the pack (it imports the trainer relatively), without
    running `nodes/__init__.py`, which needs ComfyUI: the record store itself does not."""
    for name, folder in (("finetune_pack", TESTS.parent), ("finetune_pack.nodes", TESTS.parent / "nodes")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    return importlib.import_module("finetune_pack.nodes.runs")


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """ComfyUI with the pack linked and the tiny models installed."""
    return prepare_host()


@pytest.fixture(scope="session")
def tiny_checkpoint(comfyui_dir: Path) -> str:
    """The tiny random SD1 checkpoint's name in ComfyUI's checkpoint lists."""
    return tiny_checkpoint_name(comfyui_dir, "sd1")


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One ComfyUI server for the session. Fails every test that uses it if the pack did not load completely."""
    expected, warnings = expected_node_ids(comfyui_dir)
    server = start_server(comfyui_dir, tmp_path_factory.mktemp("comfyui"))
    try:
        require_complete_pack(server, expected, warnings)
        yield server
    finally:
        server.stop()


def require_complete_pack(server, expected: set[str], warnings: list[str]) -> None:
    """Fail (the message and the log's tail, no traceback) unless every node of the pack loaded."""
    try:
        if warnings:
            raise server.fail("the pack disabled nodes although every requirement is installed:\n  "
                              + "\n  ".join(warnings))
        check_pack_loaded(server, expected)
    except ServerError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def comfy(comfy_server) -> ComfyClient:
    """A client of the session's server."""
    return ComfyClient(comfy_server.base_url)


@pytest.fixture
def start_extra_server(comfyui_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`start(extra_env=..., pythonpath_first=[...])` starts another server (stopped after the test)."""
    started = []

    def start(**options):
        server = start_server(comfyui_dir, tmp_path_factory.mktemp("comfyui-extra"), **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium (a playwright Browser); skipped, loudly, where there is none."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def comfy_page(browser, comfy_server):
    """ComfyUI's page on the session's server, ready to use; `.page` is the playwright Page."""
    page = open_comfy(browser, comfy_server.base_url)
    yield page
    page.close()
