# Quick start: `make demo` (search -> threshold -> slim -> retrain on the embedded digits data), `make test`.
# Each sets up .venv on first use (torch from PyPI, then vitslim in editable mode with its test extras).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitslim-installed

.PHONY: setup demo test clean

# vitslim itself installs without build isolation, so that setup.py sees torch and builds the CUDA extension
# (vitslim_kernels._C) when nvcc is there; it skips it, and says why, when not (VITSLIM_SKIP_CUDA_BUILD=1 too).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/kernels/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The whole flow on the embedded digits data: dense pre-training + search, then threshold + slim + retrain
# + report (runs/demo/report.json). Starts afresh each time.
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m vitslim.search --output-dir runs/demo/search --workers 0
	$(PY) -m vitslim.retrain --searched runs/demo/search/checkpoint.pt --output-dir runs/demo --workers 0

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache vitslim_kernels/_C*.so vitslim_kernels/_build_info.json
