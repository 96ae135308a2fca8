"""A real ComfyUI Manager install: the Manager's own CLI (`python -m cm_cli install <git url>`, ComfyUI Manager
as ComfyUI's manager_requirements.txt installs it) clones the pack from a file:// git URL of a local clone into a
fresh copy of ComfyUI, installs its requirements its own way, and after a restart (with `--enable-manager`) every
node of the pack loads with no manual step.

Runs where the Manager is installed beside ComfyUI: the newest host (make test-newest) has it; ComfyUI 0.3.75 ships
no manager_requirements.txt, so there the test is skipped, loudly. The clone holds the committed pack (HEAD).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import host
from tests.comfy.server import check_pack_loaded, expected_node_ids, server_env, start_server

MANAGER_CLI = "cm_cli"
# What a fresh ComfyUI does not have: our pack, models, and the folders a server writes.
NOT_COPIED = {host.PACK_LINK_NAME, "models", "user", "output", "input", "temp"}
"""In ComfyUI's folder and its custom_nodes/."""
INSTALL_TIMEOUT_S = 600


@pytest.fixture
def manager_cli():
    if importlib.util.find_spec(MANAGER_CLI) is None:
        pytest.skip("NO COMFYUI MANAGER in this environment: the Manager install is not tested here. It is installed "
                    "from ComfyUI's manager_requirements.txt (ComfyUI 0.33+); CI tests it on the newest host "
                    "(make test-newest).")
    if shutil.which("git") is None:
        pytest.skip("NO GIT: the ComfyUI Manager installs a git URL with git; install git to test it.")
    return [sys.executable, "-m", MANAGER_CLI]


def fresh_comfyui(source: Path, target: Path) -> Path:
    """A copy of ComfyUI's own files, without our pack, models or anything a server wrote."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) in (source, source / "custom_nodes")
        return [name for name in names if name == "__pycache__" or (top and name in NOT_COPIED)]

    shutil.copytree(source, target, symlinks=True, ignore=ignore)
    return target


def local_git_url(folder: Path) -> str:
    """A bare clone of the pack's committed state, named as the pack is, and its file:// URL (the Manager takes
    only URLs with a host part, so `localhost`)."""
    bare = folder / f"{host.PACK_LINK_NAME}.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(host.REPO), str(bare)], check=True, timeout=120)
    return f"file://localhost{bare}"


def test_the_manager_installs_the_pack_from_a_git_url_and_its_nodes_load_after_a_restart(
        manager_cli, comfyui_dir, tmp_path):
    comfy = fresh_comfyui(comfyui_dir, tmp_path / "ComfyUI")
    url = local_git_url(tmp_path)

    done = subprocess.run([*manager_cli, "install", url, "--mode", "local", "--exit-on-fail"], cwd=tmp_path,
                          env={**server_env(tmp_path), "COMFYUI_PATH": str(comfy)}, capture_output=True,
                          text=True, timeout=INSTALL_TIMEOUT_S)

    output = done.stdout + done.stderr
    installed = comfy / "custom_nodes" / host.PACK_LINK_NAME
    assert done.returncode == 0 and "Installation was successful." in output and "[INSTALLED]" in output, output[-4000:]
    assert (installed / ".git").is_dir() and not installed.is_symlink()  # the Manager's clone, not our link
    with start_server(comfy, tmp_path / "server", extra_args=["--enable-manager"]) as server:
        expected, _ = expected_node_ids(comfy)
        served = check_pack_loaded(server, expected)  # no IMPORT FAILED, every node of the pack in /object_info
        assert set(served) == expected
        assert "ComfyUI-Manager" in server.log_text()  # the restart really ran with the Manager
