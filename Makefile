# The two commands a user needs: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs, pinned by constraints/dev.txt
# (torch==2.13.0 in particular: the CPU build that lies on this machine's disk).
# `make test-bare` checks the NumPy-only install: `pip install .` plus pytest and hypothesis in
# .venv-bare, then every test not marked `frameworks` (the MXNet system, the data loaders, the docs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints/dev.txt
VENV_BARE ?= .venv-bare
PY_BARE := $(VENV_BARE)/bin/python
SOURCES := $(shell find src -name '*.py' -o -name py.typed)

.PHONY: demo test test-bare lint bench reproduce clean

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

# --fail-on-skip: in the full run every test runs; a skipped one fails it (tests/conftest.py).
test: $(VENV)/.test-installed
	$(PY) -m ruff check src tests
	$(PY) -m pytest --fail-on-skip

$(PY_BARE):
	$(PYTHON) -m venv $(VENV_BARE)
	$(PY_BARE) -m pip install --quiet --upgrade pip

# A regular (not editable) install, so the tests import what `pip install ftmlopt` would give;
# reinstalled whenever a source file changes.
$(VENV_BARE)/.bare-installed: $(PY_BARE) pyproject.toml constraints/dev.txt $(SOURCES)
	$(PY_BARE) -m pip install --quiet --constraint constraints/dev.txt . pytest hypothesis
	touch $@

test-bare: $(VENV_BARE)/.bare-installed
	$(PY_BARE) -m pytest -m "not frameworks" --fail-on-skip -p no:cacheprovider

bench: $(VENV)/.test-installed
	$(PY) -m ftmlopt bench

clean:
	rm -rf $(VENV) $(VENV_BARE) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
