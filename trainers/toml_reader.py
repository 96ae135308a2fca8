"""TOML reading on every Python ComfyUI runs on: `tomllib` is in the standard library from 3.11, and `tomli` (the
same parser, a conditional requirement) provides it on 3.10."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from tomllib import TOMLDecodeError, loads  # novm (3.10 takes the branch below)
else:  # pragma: no cover - exercised by the Python 3.10 test
    from tomli import TOMLDecodeError, loads

__all__ = ["TOMLDecodeError", "loads"]
