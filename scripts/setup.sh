#!/usr/bin/env bash
# Build what the tests and the demo need: the virtual environment (.venv), the ComfyUI host, and Debian's
# chromium for the browser tests. Idempotent, and quick once everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# build_venv VENV COMFY: a virtual environment with the pinned torch, that ComfyUI's requirements (and its
# ComfyUI Manager's, where it lists them) and the pack's development requirements; redone only when one of those
# files changes.
build_venv() {
  local venv=$1 comfy=$2
  local requirements=(-r "$comfy/requirements.txt")
  [[ -f $comfy/manager_requirements.txt ]] && requirements+=(-r "$comfy/manager_requirements.txt")
  local stamp=$venv/.installed-$(cat scripts/pins.txt scripts/requirements-dev.txt "$comfy"/*requirements.txt \
                                 | sha1sum | cut -c1-12)
  [[ -x $venv/bin/python ]] || "$PY" -m venv "$venv"
  if [[ ! -f $stamp ]]; then
    echo "setup: installing torch and ComfyUI's requirements into $venv (a few minutes the first time)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c scripts/pins.txt torch torchvision
    "$venv/bin/python" -m pip install -q -c scripts/pins.txt "${requirements[@]}" -r scripts/requirements-dev.txt
    rm -f "$venv"/.installed-*
    touch "$stamp"
  fi
}

if [[ ${1:-} == --newest ]]; then
  # The second host: the newest ComfyUI source archive beside the clone, with its own environment (its frontend
  # pin conflicts with the first host's). Prints the ComfyUI folder and the environment's python; nothing when
  # there is no archive.
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  status=0
  COMFY=$(.venv/bin/python scripts/host.py --newest) || status=$?
  [[ $status -eq 3 ]] && exit 0
  [[ $status -eq 0 ]] || exit $status
  VERSION=$(basename "$(dirname "$COMFY")"); VERSION=${VERSION#.host-}
  build_venv ".venv-comfyui-$VERSION" "$COMFY"
  ".venv-comfyui-$VERSION/bin/python" scripts/tiny_models.py --comfy "$COMFY" >&2
  echo "$COMFY"
  echo "$PWD/.venv-comfyui-$VERSION/bin/python"
  exit 0
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
COMFY=$(.venv/bin/python scripts/host.py | tail -n 1)
build_venv .venv "$COMFY"

# Light environments of the oldest and newest Python ComfyUI runs on (the pack's requirements that need no torch),
# for tests/unit/test_python_versions.py. Taken from pyenv or PATH; that test says loudly when one is missing.
PYENV_VERSIONS=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")/versions
for version in 3.10 3.13; do
  python=$(ls -d "$PYENV_VERSIONS"/$version.*/bin/python$version 2>/dev/null | sort -V | tail -n 1 || true)
  python=${python:-$(command -v python$version || true)}
  light=.venv-python$version
  if [[ -n $python && ! -f $light/.installed ]]; then
    "$python" -m venv "$light"
    "$light/bin/python" -m pip install -q $(grep -E '^tomli' requirements.txt | tr -d ' ')
    touch "$light/.installed"
  fi
done

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
