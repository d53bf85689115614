# Two set-up commands (see README.md): `make run` and `make test`.
# torch is installed first, pinned to the CPU build: an unpinned torch pulls GBs of CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
SCENARIO ?= scenarios/default.toml
PYTEST_ARGS ?=
# the suite runs on 2 worker processes (CI has 2 cores); each test file stays on one worker
PYTEST_WORKERS ?= 2

.PHONY: run test install test-deps bench clean

$(VENV)/.stamp-install: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH)
	$(PY) -m pip install -q --no-compile -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.stamp-install

test-deps: $(VENV)/.stamp-test

run: install
	$(VENV)/bin/fedsim run $(SCENARIO)

test: test-deps
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_engine.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
