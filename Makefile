# The two commands a user needs: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs, pinned by constraints/dev.txt
# (torch==2.13.0 in particular: the CPU build that lies on this machine's disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints/dev.txt

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

demo: $(VENV)/.demo-installed
	$(PY) -m ftmlopt demo

lint: $(VENV)/.test-installed
	$(PY) -m ruff check src tests

test: $(VENV)/.test-installed
	$(PY) -m ruff check src tests
	$(PY) -m pytest

bench: $(VENV)/.test-installed
	$(PY) -m ftmlopt bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
