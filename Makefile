# Quick start: `make demo` (search -> threshold -> slim -> retrain on the embedded digits data), `make test`.
# Each sets up .venv on first use (torch from PyPI, then vitslim in editable mode with its test extras).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitslim-installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[test,demo]"
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
	rm -rf $(VENV) build *.egg-info .pytest_cache
