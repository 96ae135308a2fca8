# The two commands: `make demo` (train a LoRA in a real ComfyUI from the bundled sample images) and
# `make test` (every test: unit, integration against a real ComfyUI server, browser). Both set up first.
# `make test-newest`: the integration and browser tests again against the newest ComfyUI source archive beside
# the clone (../shared/comfyui/), in its own host and environment; CI runs both.
PY := .venv/bin/python
# The repository root is itself a package (ComfyUI imports it): keep pytest from importing it as one.
PYTEST := $(PY) -m pytest --confcutdir=tests

.PHONY: setup test test-newest demo bench clean

setup:
	bash scripts/setup.sh

test: setup
	$(PYTEST) tests

test-newest: setup
	bash scripts/test_newest.sh

demo: setup
	$(PY) scripts/demo.py

bench: setup
	@set -e; found=0; for script in bench/*.py; do \
	  [ -e "$$script" ] || continue; found=1; echo "== $$script"; $(PY) "$$script"; \
	done; [ $$found = 1 ] || { echo "make bench: no bench/*.py yet" >&2; exit 1; }

# Caches only: trained results (output/, bench/results/) and the built environments (.venv*, .host*) stay.
clean:
	rm -rf .pytest_cache
	find . -path './.venv*' -prune -o -path './.host*' -prune -o -name __pycache__ -type d -exec rm -rf {} +
