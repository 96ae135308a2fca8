"""README.md's generated sections: the text between a section's two marker lines is replaced by a script's output,
and `--check` tells whether what is there is current."""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def with_section(begin: str, end: str, body: str) -> str:
    """README.md's text with the section from `begin` to `end` (markers included) replaced by `body`."""
    text = README.read_text(encoding="utf-8")
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + body + text[stop:]


def write_or_check(fresh: str, argv: list[str], script: str) -> int:
    """Write `fresh` as README.md, or with `--check` exit 1 when README.md differs from it."""
    if "--check" in argv:
        if fresh != README.read_text(encoding="utf-8"):
            print(f"a generated section of README.md is stale: run python scripts/{script}", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh, encoding="utf-8")
    return 0
