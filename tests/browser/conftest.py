"""Fixtures of the browser tests: where their screenshots go, and training images in the server's input folder.
The browser itself, and the skip when Chromium or playwright is missing, come from tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.comfy.training import sample_images_in

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "output" / "browser-screenshots"
"""Inside the git-ignored output/ folder: artifacts for a person (or CI) to look at."""


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="session")
def training_images(comfy_server) -> str:
    """Four captioned sample images in a subfolder of the server's input folder; returns its name."""
    return sample_images_in(comfy_server.input_dir, "browser_robots").name
