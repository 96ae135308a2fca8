"""What the benches share: running each trainer while measuring it, and printing the results as tables.

Importing this package puts the repository root on `sys.path`, so the benches run as plain scripts
(`python bench/train_speed.py`) and still import `trainers`, `scripts` and the ComfyUI test host.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
"""Run folders, logs and the JSON of the last results (ignored by git)."""

for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
