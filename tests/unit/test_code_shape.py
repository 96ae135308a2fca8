"""The code stays readable as short named steps: no function in trainers/ or nodes/ is longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 80


def long_functions(folder: Path, limit: int, root: Path = REPO) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    offenders = [f for folder in ("trainers", "nodes") for f in long_functions(REPO / folder, MAX_LINES)]
    assert not offenders, "split these into named steps:\n" + "\n".join(offenders)


def test_the_check_sees_a_long_function(tmp_path):
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * MAX_LINES)
    (tmp_path / "short.py").write_text("def g():\n" + "    x = 1\n" * (MAX_LINES - 1))
    assert long_functions(tmp_path, MAX_LINES, root=tmp_path) == ["long.py:1 f (81 lines)"]
