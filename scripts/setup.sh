#!/usr/bin/env bash
# Build what the tests and the demo need: the virtual environment (.venv), the ComfyUI host, and Debian's
# chromium for the browser tests. Idempotent, and quick once everything is there.
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

browser_missing() { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }
if browser_missing; then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO=sudo
  if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 || -n $SUDO ]]; then
    echo "setup: installing chromium and chromium-driver with apt-get (for the browser tests)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
if browser_missing; then
  cat >&2 <<'MSG'
################################################################################
setup: NO CHROMIUM - THE BROWSER TESTS WILL BE SKIPPED.
  Install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)
  or put a chromium on PATH, then run `make test` again.
################################################################################
MSG
fi
echo "$COMFY"
