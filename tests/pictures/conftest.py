"""The drawing base (`scripts/drawing_base.py`) installed into the session's ComfyUI: built once per machine
(minutes on a CPU) and then taken from the user cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def drawing_base(comfyui_dir: Path) -> str:
    """The drawing base's name in ComfyUI's checkpoint lists."""
    from scripts import drawing_base as base

    installed = base.install_into(comfyui_dir)
    return installed.relative_to(comfyui_dir / "models" / "checkpoints").as_posix()


@pytest.fixture(scope="session", autouse=True)
def _remove_trained_results(comfyui_dir: Path):
    """What this session trained leaves ComfyUI's models folder with the session."""
    from tests.comfy.pictures import RESULT_PREFIX

    yield
    for folder in ("loras", "checkpoints", "embeddings", "controlnet"):
        for path in (comfyui_dir / "models" / folder).glob(f"{RESULT_PREFIX}*"):
            path.unlink(missing_ok=True)
