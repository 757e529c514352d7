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

.PHONY: demo test lint bench reproduce clean

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

lint: $(VENV)/.test-installed
	$(PY) -m ruff check src tests

test: $(VENV)/.test-installed $(VENV_TF)/.tf-installed
	$(PY) -m ruff check src tests
	FTMLOPT_TENSORFLOW_PYTHON=$(abspath $(PY_TF)) $(PY) -m pytest

bench: $(VENV)/.test-installed
	$(PY) -m ftmlopt bench

clean:
	rm -rf $(VENV) $(VENV_TF) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
