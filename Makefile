# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Each builds its own virtual environment from nothing on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/selfattn demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.bench
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
