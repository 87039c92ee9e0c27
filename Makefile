# Quick start: `make demo` (search -> threshold -> slim -> retrain on the embedded digits data), `make test`.
# Each sets up .venv on first use (torch from PyPI, then vitslim in editable mode with its test extras).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitslim-installed

.PHONY: setup demo demo-swin test test-compat gpu-check clean

# vitslim itself installs without build isolation, so that setup.py sees torch and builds the CUDA extension
# (vitslim_kernels._C) when nvcc is there; it skips it, and says why, when not (VITSLIM_SKIP_CUDA_BUILD=1 too).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/kernels/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The whole flow on the embedded digits data: dense pre-training + search, a plan for a FLOPs target with
# aligned widths (runs/demo/plan_flops_0.6.json), then slim + retrain of that plan + report
# (runs/demo/report.json). Starts afresh each time. (One intra-op thread: the commands' default on this data.)
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m vitslim.search --output-dir runs/demo/search --workers 0
	$(PY) -m vitslim.plan --searched runs/demo/search/checkpoint.pt --target-flops 0.6 --align-heads 4 \
		--align-mlp 32 -o runs/demo/plan_flops_0.6.json
	$(PY) -m vitslim.retrain --searched runs/demo/search/checkpoint.pt --plan runs/demo/plan_flops_0.6.json \
		--output-dir runs/demo --workers 0

# The same flow on the embedded tiny Swin (vitslim_digits_swin: windows, a shifted block per stage, patch merging;
# no token gates): runs/demo-swin/report.json.
demo-swin: $(STAMP)
	rm -rf runs/demo-swin
	$(PY) -m vitslim.search --model vitslim_digits_swin --output-dir runs/demo-swin/search --workers 0
	$(PY) -m vitslim.plan --searched runs/demo-swin/search/checkpoint.pt --target-flops 0.6 --align-heads 4 \
		--align-mlp 32 -o runs/demo-swin/plan_flops_0.6.json
	$(PY) -m vitslim.retrain --searched runs/demo-swin/search/checkpoint.pt --plan runs/demo-swin/plan_flops_0.6.json \
		--output-dir runs/demo-swin --workers 0

test: $(STAMP)
	$(PY) -m pytest -q

# The same suite on the oldest supported stack (requirements/oldest-supported.txt: the GPU image's torch 2.11 and
# triton 3.6, timm 1.0.25, numpy < 2.4), on Python 3.12 where pyenv has it (the GPU image's), else $(PYTHON).
# It runs in a copy of the tree (build/compat/src, tracked and untracked files) with its own venv, so that its
# CUDA extension, built against torch 2.11, never replaces the one .venv's torch loads.
COMPAT := build/compat
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(PYTHON))
COMPAT_STAMP := $(COMPAT)/venv/.vitslim-deps
$(COMPAT_STAMP): requirements/oldest-supported.txt pyproject.toml
	rm -rf $(COMPAT)/venv
	$(COMPAT_PYTHON) -m venv $(COMPAT)/venv
	$(COMPAT)/venv/bin/pip install --quiet --upgrade pip setuptools wheel ninja
	$(COMPAT)/venv/bin/pip install --quiet -c requirements/oldest-supported.txt torch torchvision triton timm numpy
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	rm -rf $(COMPAT)/src && mkdir -p $(COMPAT)/src
	git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(COMPAT)/src
	cd $(COMPAT)/src && ../venv/bin/pip install --quiet -c ../../../requirements/oldest-supported.txt \
		--no-build-isolation -e ".[test]"
	cd $(COMPAT)/src && ../venv/bin/python -m pytest -q -p no:cacheprovider

# Everything the project must show on a GPU in one call that fits a lent machine (benchmarks/gpu_check.py):
# device limits, build, selftest, GPU tests, compute-sanitizer, benchmarks P1-P4, the compiled baselines, autotune,
# the loader; SUMMARY.md, gpu_check.json and gpu_check.tgz in $OUT. On the GPU machine (its python3 has torch,
# triton, timm): `make gpu-check GPU_CHECK_ARGS="--commit COMMIT"`. Anywhere else, the same orchestration on the
# CPU: `make gpu-check GPU_CHECK_ARGS="--dry-run"`.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache vitslim_kernels/_C*.so vitslim_kernels/_build_info.json
