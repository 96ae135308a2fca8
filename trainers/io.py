"""Atomic file writes: write to a temporary name in the same folder, then rename, so no reader ever sees half a file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConfigError


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def unique_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/stem.suffix`, or `stem_2.suffix`, `stem_3.suffix`... if taken: never overwrite someone's file."""
    candidate = folder / f"{stem}{suffix}"
    n = 2
    while candidate.exists():
        candidate = folder / f"{stem}_{n}{suffix}"
        n += 1
    return candidate


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Results are never replaced silently: an existing file stays unless the user asked to overwrite it."""
    if Path(path).exists() and not overwrite:
        raise ConfigError("a file of that name already exists and would be replaced",
                          "set output.overwrite = true, or choose another output.name", where=str(path))
