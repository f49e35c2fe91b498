# The README's two commands. Each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-tools bench chaos down clean

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cicd-heal needs Python 3.11 or newer; found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)  ## start the embedded stack, run the end-to-end demo, print the summary
	$(BIN)/cicd demo

test: $(STAMP) test-tools  ## the whole test suite: unit, then integration (real Redis, real workers)
	$(BIN)/python -m pytest

# docker-compose lets tests/unit/test_compose.py also check docker-compose.yml as compose reads it;
# without it that check skips. Installed only when missing and only as root; never fatal.
test-tools:
	@if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make test: installing docker-compose (apt-get) for tests/unit/test_compose.py"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } >/dev/null 2>&1 \
	      || echo "make test: could not install docker-compose; test_compose.py skips compose's own check"; \
	  else \
	    echo "make test: no docker-compose, and installing it needs root and apt-get; test_compose.py skips compose's own check"; \
	  fi; \
	fi

bench: $(STAMP)  ## benchmarks: every figure beside its baseline, from one run (never timed assertions)
	$(BIN)/cicd bench

chaos: $(STAMP)  ## the big chaos run: kills workers and Redis under a burst of incidents, prints the table
	$(BIN)/python -m tests.chaos.harness

down: $(STAMP)  ## stop the stack and the demo app
	$(BIN)/cicd down --apps

clean:
	rm -rf $(VENV) var logs apps/registry *.egg-info
