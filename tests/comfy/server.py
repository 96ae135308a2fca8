"""Start and stop a real ComfyUI server with the pack installed, each in its own temporary folders."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import requests

from scripts import host

STARTUP_TIMEOUT_S = 180
PACK_MODULE = f"custom_nodes.{host.PACK_LINK_NAME}"
"""`python_module` of the pack's nodes in /object_info."""
SETTINGS = {"Comfy.TutorialCompleted": True}
# How ComfyUI's log gives the reason a pack failed to load (nodes.py, load_custom_node).
IMPORT_ERROR_PREFIXES = ("Cannot import", "Error while calling comfy_entrypoint")

# Lists the pack's node ids the way ComfyUI loads them (V3 entry point), run in a fresh interpreter so that the
# test process never imports ComfyUI. Prints one JSON object: node ids and the pack's warnings.
_LIST_NODES = r"""
import asyncio, importlib.util, json, logging, sys
comfy_dir, pack_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
warnings = []
class Collect(logging.Handler):
    def emit(self, record):
        if record.name.startswith(("comfyui-finetune", "finetune_pack")):
            warnings.append(record.getMessage())
handler = Collect(level=logging.WARNING)
logging.getLogger().addHandler(handler)
spec = importlib.util.spec_from_file_location("finetune_pack", pack_dir + "/__init__.py",
                                              submodule_search_locations=[pack_dir])
pack = importlib.util.module_from_spec(spec)
sys.modules["finetune_pack"] = pack
spec.loader.exec_module(pack)
extension = asyncio.run(pack.comfy_entrypoint())
classes = asyncio.run(extension.get_node_list())
print(json.dumps({"node_ids": [cls.GET_SCHEMA().node_id for cls in classes],  # validated, as ComfyUI does
                  "warnings": warnings}))
"""


class ServerError(RuntimeError):
    """ComfyUI did not start, or started without the pack's nodes; the message ends with the log's tail."""


@dataclass
class ComfyServer:
    base_url: str
    comfyui_dir: Path
    models_dir: Path
    output_dir: Path
    input_dir: Path
    log_path: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def object_info(self) -> dict[str, Any]:
        response = requests.get(self.base_url + "/object_info", timeout=30)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        """End the server and anything it started (training runs), by its process group."""
        if self.process.poll() is not None:
            return
        for sig, grace_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def fail(self, problem: str) -> ServerError:
        return ServerError(f"{problem}\n--- {self.log_path} (last lines) ---\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.fail(f"ComfyUI exited with status {self.process.returncode} while starting")
            try:
                if requests.get(self.base_url + "/object_info", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise self.fail(f"ComfyUI did not answer /object_info within {timeout:.0f} s")


def prepare_host(families: Iterable[str] = ("sd1",)) -> Path:
    """ComfyUI ready to run: present (COMFYUI_PATH or the bundled host), the pack linked, tiny models installed."""
    comfy = host.ensure_host()
    from scripts import tiny_models  # generating the models is slow: only when a server is wanted

    tiny_models.install_into(comfy, families=tuple(families))
    return comfy


def tiny_checkpoint_name(comfy_dir: Path, family: str = "sd1") -> str:
    """The tiny checkpoint's name as ComfyUI's checkpoint inputs list it (installing it when it is not there)."""
    from scripts import tiny_models

    installed = tiny_models.install_into(comfy_dir, families=(family,))[family]
    return installed.relative_to(Path(comfy_dir) / "models" / "checkpoints").as_posix()


def start_server(comfy_dir: Path, workdir: Path, *, output_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, pythonpath_first: Iterable[Path] = (),
                 extra_args: Iterable[str] = (), timeout: float = STARTUP_TIMEOUT_S) -> ComfyServer:
    """Start `python main.py --cpu [extra_args]` on a free port with its input/output/temp/user folders under
    `workdir` (output in `output_dir` when given) and wait until it serves /object_info."""
    workdir.mkdir(parents=True, exist_ok=True)
    folders = {name: workdir / name for name in ("input", "output", "temp", "user")}
    if output_dir is not None:
        folders["output"] = Path(output_dir)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    settings = folders["user"] / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(SETTINGS))

    port = _free_port()
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--input-directory", str(folders["input"]), "--output-directory", str(folders["output"]),
               "--temp-directory", str(folders["temp"]), "--user-directory", str(folders["user"]),
               "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes",  # they only call a remote service, which is out of reach offline
               *extra_args]
    log_path = workdir / "comfyui.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=comfy_dir, env=server_env(workdir, extra_env, pythonpath_first),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ComfyServer(f"http://127.0.0.1:{port}", Path(comfy_dir), Path(comfy_dir) / "models",
                         folders["output"], folders["input"], log_path, process)
    try:
        server._wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def server_env(workdir: Path, extra_env: dict[str, str] | None = None,
               pythonpath_first: Iterable[Path] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HOME=str(workdir / "hf_home"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    first = [str(path) for path in pythonpath_first]
    if first:
        env["PYTHONPATH"] = os.pathsep.join(first + [p for p in [env.get("PYTHONPATH", "")] if p])
    return env


def expected_node_ids(comfy_dir: Path, env: dict[str, str] | None = None) -> tuple[set[str], list[str]]:
    """The node ids the pack registers in this environment, and the warnings it logs while doing so."""
    done = subprocess.run([sys.executable, "-c", _LIST_NODES, str(comfy_dir), str(host.REPO)], cwd=comfy_dir,
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ServerError(f"the pack cannot be imported the way ComfyUI imports it:\n{done.stderr[-4000:]}")
    listing = json.loads(done.stdout.strip().splitlines()[-1])
    return set(listing["node_ids"]), listing["warnings"]


def pack_nodes(object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pack's entries in /object_info."""
    return {name: info for name, info in object_info.items() if info.get("python_module") == PACK_MODULE}


def check_pack_loaded(server: ComfyServer, expected: set[str]) -> dict[str, dict[str, Any]]:
    """Raise ServerError unless the log is free of IMPORT FAILED for the pack and /object_info has exactly the
    expected nodes; returns the pack's /object_info entries."""
    lines = [line.strip() for line in server.log_text().splitlines() if host.PACK_LINK_NAME in line]
    if any("IMPORT FAILED" in line for line in lines):
        reasons = [line for line in lines if line.startswith(IMPORT_ERROR_PREFIXES)]
        raise server.fail("ComfyUI could not import the pack:\n  " + "\n  ".join(reasons or lines))
    if not expected:
        raise server.fail("the pack registers no nodes at all")
    served = pack_nodes(server.object_info())
    missing = sorted(expected - set(served))
    if missing:
        raise server.fail(f"nodes missing from /object_info: {', '.join(missing)}")
    return served


def hide_module(folder: Path, module: str) -> Path:
    """A folder that, put first on PYTHONPATH, makes `<module>` look not installed to `import` and to
    `importlib.util.find_spec` alike (a `None` entry in sys.modules, set by a sitecustomize)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
