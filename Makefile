# The README's two commands. Each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-docker bench chaos down clean

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cicd-heal needs Python 3.11 or newer; found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)  ## start the embedded stack, run the end-to-end demo, print the summary
	$(BIN)/cicd demo

test: $(STAMP)  ## the whole test suite: unit, then integration (real Redis, real workers)
	@sh .ci/install-test-tools || true  # chromium, docker, postgresql...: tests that need them skip without
	$(BIN)/python -m pytest

test-docker: $(STAMP)  ## only the Docker tier: its own dockerd, the Docker runtime, the compose stack
	@sh .ci/install-test-tools || true
	$(BIN)/python -m pytest -m docker tests/docker

bench: $(STAMP)  ## benchmarks: every figure beside its baseline, from one run (never timed assertions)
	$(BIN)/cicd bench

chaos: $(STAMP)  ## the big chaos run: kills workers and Redis under a burst of incidents, prints the table
	$(BIN)/python -m tests.chaos.harness

down: $(STAMP)  ## stop the stack and the demo app
	$(BIN)/cicd down --apps

clean:
	rm -rf $(VENV) var logs apps/registry *.egg-info
