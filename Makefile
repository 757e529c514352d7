# The two commands a user needs: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs, pinned by constraints/dev.txt
# (torch==2.13.0 in particular: the CPU build that lies on this machine's disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints/dev.txt
# TensorFlow (Keras' default backend) gets its own venv; see constraints/tensorflow.txt.
VENV_TF ?= .venv-tf
PY_TF := $(VENV_TF)/bin/python

.PHONY: demo test lint bench gpu-check reproduce clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: $(PY) pyproject.toml constraints/dev.txt
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.test-installed: $(PY) pyproject.toml constraints/dev.txt
	$(PIP) -e '.[all,test]'
	touch $@

$(PY_TF):
	$(PYTHON) -m venv $(VENV_TF)
	$(PY_TF) -m pip install --quiet --upgrade pip

$(VENV_TF)/.tf-installed: $(PY_TF) pyproject.toml constraints/dev.txt constraints/tensorflow.txt
	$(PY_TF) -m pip install --quiet --constraint constraints/dev.txt --constraint constraints/tensorflow.txt \
		-e '.[keras,test-min]' tensorflow-cpu
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m ftmlopt demo

# `make test-bare`: the NumPy-only install. `pip install .` (a regular install, so the tests import what
# `pip install ftmlopt` gives; redone whenever a source file changes) plus pytest and hypothesis in
# .venv-bare, then every test not marked `frameworks` (the MXNet system, the data loaders, the docs'
# NumPy examples). A skipped test fails any run unless --allow-skips is given (tests/conftest.py).
VENV_BARE ?= .venv-bare
PY_BARE := $(VENV_BARE)/bin/python
SOURCES := $(shell find src -name '*.py' -o -name py.typed)
.PHONY: test-bare clean-bare

$(PY_BARE):
	$(PYTHON) -m venv $(VENV_BARE)
	$(PY_BARE) -m pip install --quiet --upgrade pip

$(VENV_BARE)/.bare-installed: $(PY_BARE) pyproject.toml constraints/dev.txt $(SOURCES)
	$(PY_BARE) -m pip install --quiet --constraint constraints/dev.txt . pytest hypothesis
	touch $@

test-bare: $(VENV_BARE)/.bare-installed
	$(PY_BARE) -m pytest -m "not frameworks" -p no:cacheprovider

clean: clean-bare
clean-bare:
	rm -rf $(VENV_BARE)

# `make test-oldest`: the oldest declared version of every dependency (docs/versions.md). .venv-oldest is built
# from constraints/oldest.txt: numpy 1.23.3, llvmlite 0.44, jax 0.4.30, Keras 3.5.0 (JAX and torch backends)
# and torch 2.13.0 (the only torch here), in which the NumPy, torch, Keras and CPU-kernel tests run; then
# optax 0.2.4 goes in (its chex needs numpy 1.24.1: constraints/oldest-optax.txt) and the optax tests run. The
# integration tests of libraries that are only test dependencies (Lightning, transformers, flax) and the
# Triton interpreter tests are not part of it.
VENV_OLD ?= .venv-oldest
PY_OLD := $(VENV_OLD)/bin/python
PIP_OLD := $(PY_OLD) -m pip install --quiet
OLDEST_TESTS := tests/mxnet tests/torch tests/keras tests/kernels tests/fuzz/test_fuzz_numpy.py \
	tests/fuzz/test_fuzz_torch.py tests/fuzz/test_fuzz_keras.py tests/lowbit \
	tests/test_doctests.py -k 'not test_docstring_examples_run or mxnet or rule or lowbit'
OLDEST_NOT := --ignore=tests/torch/test_torch_integrations.py --ignore=tests/kernels/test_triton_interpret.py \
	--deselect tests/kernels/test_lowbit_fused_torch.py::test_triton_interpreter_matches_the_reference_bit_for_bit \
	--deselect tests/kernels/test_lowbit_fused_torch.py::test_triton_interpreter_matches_the_reference_on_non_finite_blocks \
	--deselect tests/kernels/test_lowbit_fused_torch.py::test_kernel_compiles_for_sm90_with_correctly_rounded_float32_and_no_fma \
	--deselect 'tests/keras/test_keras.py::test_keras_backend[tensorflow]'
OLDEST_OPTAX_TESTS := tests/jax tests/fuzz/test_fuzz_optax.py
.PHONY: test-oldest clean-oldest

$(PY_OLD):
	$(PYTHON) -m venv $(VENV_OLD)
	$(PY_OLD) -m pip install --quiet --upgrade pip

$(VENV_OLD)/.oldest-installed: $(PY_OLD) pyproject.toml constraints/oldest.txt constraints/oldest-optax.txt
	$(PIP_OLD) --constraint constraints/oldest.txt -e '.[cpu,keras,torch]' jax jaxlib pytest hypothesis
	touch $@

test-oldest: $(VENV_OLD)/.oldest-installed
	$(PY_OLD) -m pip uninstall --quiet --yes optax chex
	$(PIP_OLD) --constraint constraints/oldest.txt numpy
	KERAS_BACKEND=jax $(PY_OLD) -m pytest -p no:cacheprovider $(OLDEST_NOT) $(OLDEST_TESTS)
	$(PIP_OLD) --constraint constraints/oldest-optax.txt numpy optax
	$(PY_OLD) -m pytest -p no:cacheprovider $(OLDEST_OPTAX_TESTS)

clean: clean-oldest
clean-oldest:
	rm -rf $(VENV_OLD)

# ruff, then mypy over src/ (flags in pyproject.toml [tool.mypy]).
lint: $(VENV)/.test-installed
	$(PY) -m ruff check src tests
	$(PY) -m mypy

test: $(VENV)/.test-installed $(VENV_TF)/.tf-installed
	$(PY) -m ruff check src tests
	$(PY) -m mypy
	FTMLOPT_TENSORFLOW_PYTHON=$(abspath $(PY_TF)) $(PY) -m pytest

# The documentation site, docs/_build/html (conf.py says why Sphinx, MyST, furo). autodoc imports the real
# modules, so it builds in .venv with every extra; warnings (broken references included: nitpicky) fail it.
$(VENV)/.docs-installed: $(VENV)/.test-installed
	$(PIP) -e '.[all,docs]'
	touch $@

docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

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
	rm -rf $(VENV) $(VENV_TF) docs/_build build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
