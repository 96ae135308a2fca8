"""Every Python ComfyUI runs on (3.10-3.13): each module of the pack compiles with the oldest and the newest, the
modules that need no third-party package import there (with the pack's own conditional requirements: tomli on
3.10), and vermin finds nothing that needs a newer Python than `requires-python` allows.

The interpreters are the light environments scripts/setup.sh builds from pyenv's 3.10 and 3.13
(`.venv-python3.10`, `.venv-python3.13`); where one is missing its tests are skipped with a loud message."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("trainers", "nodes", "scripts", "bench", "tests")
OLDEST, NEWEST = "3.10", "3.13"
ALLOWED_THIRD_PARTY = {"tomli"}
"""What the light environments hold (the pack's conditional requirement)."""

# Run by the other interpreter: compile every file given (no .pyc written), then import the modules given.
_COMPILE_AND_IMPORT = r"""
import importlib, json, sys, traceback
files, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
problems = {}
for path in files:
    try:
        compile(open(path, encoding="utf-8").read(), path, "exec")
    except SyntaxError as exc:
        problems[path] = f"SyntaxError: {exc}"
sys.path.insert(0, sys.argv[3])
for name in modules:
    try:
        importlib.import_module(name)
    except Exception:
        problems[name] = traceback.format_exc(limit=-2)
print(json.dumps({"version": sys.version.split()[0], "problems": problems}))
"""


def interpreter(version: str) -> Path:
    python = REPO / f".venv-python{version}" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"NO PYTHON {version}: the pack is not checked on Python {version} here. Install it under pyenv "
                    f"(pyenv install {version}) and run bash scripts/setup.sh, which builds .venv-python{version}.")
    return python


def pack_files() -> list[Path]:
    files = [REPO / "__init__.py"]
    for package in PACKAGES:
        files += sorted(path for path in (REPO / package).rglob("*.py") if "__pycache__" not in path.parts)
    return files


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """The modules the file imports when it is imported (not those imported inside functions), relative imports
    made absolute."""
    names = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in run_at_import(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                names |= {target} if node.module else {f"{base}.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    return names


def run_at_import(tree: ast.AST):
    """The statements and expressions Python runs when it imports the module: all but function bodies."""
    for child in ast.iter_child_nodes(tree):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from run_at_import(child)


def modules_needing_no_third_party() -> list[str]:
    """The trainers/ modules whose own imports, followed through the pack, reach only the standard library (and
    tomli): what a Python without torch must import."""
    modules = {module_name(path): path for path in (REPO / "trainers").rglob("*.py") if "__pycache__" not in path.parts}
    verdict: dict[str, bool] = {}

    def pack_modules(target: str) -> list[str]:
        """The pack's modules that importing `target` runs: its parent packages, then itself."""
        parts = target.split(".")
        return [name for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if name in modules]

    def light(name: str) -> bool:
        if name not in verdict:
            verdict[name] = True  # an import cycle does not make a module heavy by itself
            verdict[name] = all(
                all(light(module) for module in pack_modules(target)) if target.split(".")[0] == "trainers"
                else target.split(".")[0] in sys.stdlib_module_names | ALLOWED_THIRD_PARTY
                for target in imported_names(modules[name]) - {"__future__"})
        return verdict[name]

    return sorted(name for name in modules if all(light(m) for m in pack_modules(name)))


def check_with(python: Path) -> dict:
    files = [str(path) for path in pack_files()]
    done = subprocess.run([str(python), "-I", "-c", _COMPILE_AND_IMPORT, json.dumps(files),
                           json.dumps(modules_needing_no_third_party()), str(REPO)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_light_modules_include_the_configuration_and_exclude_torch_code():
    light = modules_needing_no_third_party()

    assert {"trainers.config", "trainers.errors", "trainers.toml_reader"} <= set(light)
    assert "trainers.loop" not in light and "trainers.diffusion" not in light


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_every_module_compiles_and_the_light_ones_import(version):
    result = check_with(interpreter(version))

    assert result["version"].startswith(version + ".")
    assert result["problems"] == {}


def test_vermin_finds_nothing_that_needs_more_than_the_oldest_python():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent))
    if vermin is None:
        pytest.skip("NO VERMIN: the static minimum-version check did not run. pip install -r scripts/requirements-dev.txt")
    done = subprocess.run([vermin, "--no-tips", "--violations", "--eval-annotations", f"-t={OLDEST}-",
                           *(str(REPO / name) for name in ("__init__.py", *PACKAGES))],
                          capture_output=True, text=True, timeout=300, cwd=REPO)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
