#!/usr/bin/env bash
# The integration and browser tests against the newest ComfyUI: the source archive beside the clone
# (../shared/comfyui/ComfyUI-<version>-src.tar.gz), in its own host folder and environment built by
# `scripts/setup.sh --newest`. Without the archive it says so loudly and exits 0. Extra arguments go to pytest
# (default: tests/integration tests/browser without the tests marked slow: the tiny SD2/SDXL loads and example 7,
# which the first leg runs; this keeps the second leg within its share of the CI time).
set -euo pipefail
cd "$(dirname "$0")/.."
built=$(bash scripts/setup.sh --newest)
if [[ -z $built ]]; then
  cat >&2 <<'MSG'
################################################################################
test_newest: NO ../shared/comfyui/ComfyUI-<version>-src.tar.gz BESIDE THE CLONE -
  ONLY THE LOWEST SUPPORTED COMFYUI (make test) WAS TESTED.
################################################################################
MSG
  exit 0
fi
COMFY=$(tail -n 2 <<<"$built" | head -n 1)
PYTHON=$(tail -n 1 <<<"$built")
echo "test_newest: $(sed -n 's/.*"\(.*\)".*/ComfyUI \1/p' "$COMFY/comfyui_version.py") at $COMFY"
(($#)) || set -- -m "not slow" tests/integration tests/browser
status=0
COMFYUI_PATH=$COMFY "$PYTHON" -m pytest --confcutdir=tests "$@" || status=$?
echo "test_newest: pytest exited with $status after ${SECONDS} s (setup included)"
exit $status
