# The two commands a user needs: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs, pinned by constraints/dev.txt
# (torch==2.13.0 in particular: the CPU build that lies on this machine's disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints/dev.txt

.PHONY: demo test lint bench gpu-check reproduce clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: $(PY) pyproject.toml constraints/dev.txt
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.test-installed: $(PY) pyproject.toml constraints/dev.txt
	$(PIP) -e '.[all,test]'
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m ftmlopt demo

lint: $(VENV)/.test-installed
	$(PY) -m ruff check src tests

test: $(VENV)/.test-installed
	$(PY) -m ruff check src tests
	$(PY) -m pytest

# The interleaved CPU benchmark (tables, ratios to fused Adam, % of floor, state bytes, first step,
# forward/backward slowdown); JSON next to it. BENCH_ARGS adds options, e.g. BENCH_ARGS='--threads 2'.
bench: $(VENV)/.test-installed
	$(PY) -m ftmlopt bench $(BENCH_ARGS)

# On a CUDA machine with its own python3 (PyTorch with CUDA, Triton): no venv, nothing installed.
# Correctness of the compiled Triton kernel, CUDA graph capture, torch.compile, 16M-param benchmark;
# under 5 minutes; writes $(GPU_CHECK_OUT)/gpu_check.md and gpu_check.json.
GPU_CHECK_OUT ?= gpu-check-out
gpu-check:
	PYTHONPATH=src python3 -m ftmlopt.bench.gpu_check --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
