# Quick start: `make demo` (search -> threshold -> slim on the embedded digits data) and `make test`.
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

demo: $(STAMP)
	$(PY) -m vitslim.demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
