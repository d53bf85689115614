# Two set-up commands (see README.md): `make run` and `make test`.
# torch is installed first, pinned to the CPU build: an unpinned torch pulls GBs of CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# The index torch comes from. Empty: pip's configured index (here a mirror that serves the CPU build).
# Elsewhere PyPI's torch for Linux is the CUDA build; get the CPU one with
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# Byte-compile what was installed (and fedsim's own packages): pip runs with --no-compile and some
# environments set PYTHONDONTWRITEBYTECODE=1, so without this every process compiles torch's Python
# sources again (seconds per command). py312_intrinsics: a torch test helper in Python 3.12 syntax.
COMPILE = env -u PYTHONDONTWRITEBYTECODE $(PY) -m compileall -q -j 0 -x 'py312_intrinsics'
PACKAGES = fedsim clients strategies privacy
SCENARIO ?= scenarios/default.toml
PYTEST_ARGS ?=
# the suite runs on 2 worker processes (CI has 2 cores); each test file stays on one worker, and files go
# out in collection order (slow end-to-end tests first, tests/conftest.py), not xdist's default of the
# files with most tests first, which left the minute-long deployment and Ray files to the end on one worker
PYTEST_WORKERS ?= 2

.PHONY: run test install test-deps bench clean

$(VENV)/.stamp-install: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(PY) -m pip install -q --no-compile -e .
	$(COMPILE) $(VENV)/lib $(PACKAGES)
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(PY) -m pip install -q -e '.[test]'
	$(COMPILE) $(VENV)/lib
	touch $@

install: $(VENV)/.stamp-install

test-deps: $(VENV)/.stamp-test

run: install
	$(VENV)/bin/fedsim run $(SCENARIO)

test: test-deps
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# one table: plain loop, fedsim default, vectorised, Ray engine, Flower's own Ray simulation (whole processes);
# BENCH_ARGS=--quick for a cheap rerun; writes its section of bench/RESULTS.md and bench/bench_users.png;
# then start-up (light commands against `import torch`, round 1 against later rounds) in its own section
BENCH_ARGS ?=
bench: install
	$(PY) bench/bench_users.py $(BENCH_ARGS)
	$(PY) bench/bench_startup.py --write

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
