# Two entry points for a fresh CPU machine (no GPU, no network beyond the package registries):
#   make demo   set up .venv and run the built-in tiny end-to-end job
#   make test   set up .venv and run the test suite (what CI runs)
# Inside the NVIDIA PyTorch container use the container's python instead: `bash
# scripts/setup/install_requirements.sh` and call the scripts directly (torch must not be
# reinstalled there; the installer pins it). The venv goes through the same installer.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch for the local/CI virtualenv (a plain `torch` would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo test clean

$(VENV)/.installed: requirements.txt requirements-megatron-core.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	PIP_QUIET=1 PYTHON=$(PY) bash scripts/setup/install_requirements.sh -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) tools/demo.py

test: venv
	$(PY) -m pytest -n 2 --dist loadgroup -q --durations=15 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) .pytest_cache
