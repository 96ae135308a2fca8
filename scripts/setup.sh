#!/usr/bin/env bash
# Build the project's virtual environment (.venv) and its ComfyUI host. Quick when both exist.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed-$(cat scripts/pins.txt scripts/requirements-dev.txt | sha1sum | cut -c1-12)

if [[ ! -x $VENV/bin/python ]]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
COMFY=$("$VPY" scripts/host.py | tail -n 1)

if [[ ! -f $STAMP ]]; then
  echo "setup: installing torch and ComfyUI's requirements into $VENV (a few minutes the first time)"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q -c scripts/pins.txt torch torchvision
  "$VPY" -m pip install -q -c scripts/pins.txt -r "$COMFY/requirements.txt" -r scripts/requirements-dev.txt
  rm -f $VENV/.installed-*
  touch "$STAMP"
fi
echo "$COMFY"
