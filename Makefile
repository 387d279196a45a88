# Two entry points on a fresh machine: `make serve` and `make test`. Each builds .venv itself.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv serve test lint clean

$(STAMP): requirements.txt requirements-train.txt requirements-dev.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.11 not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)  ## serve the embedded default model (or CM_MODELS) on 127.0.0.1:8000
	$(PY) -m service $(ARGS)

test: $(STAMP)  ## lint and dead-code check, then the test suite (slow and gpu tests are skipped)
	$(PY) -m ruff check .
	$(PY) -m vulture
	$(PY) -m pytest $(ARGS)

.PHONY: image
image:  ## build the image from the Dockerfile (Docker, Podman, or buildah on a debootstrap base) and check it serves
	deploy/image.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
