# shoprank: the two commands a new user needs are `make demo` and `make test`.
# Both create the virtualenv and install everything first (safe to run again).
PYTHON      ?= python3.11
VENV        ?= .venv
BIN         := $(VENV)/bin
# CPU machines: TORCH_INDEX=https://download.pytorch.org/whl/cpu gives the small CPU wheel.
# GPU machines: leave it empty (PyPI's torch is the CUDA build) or point at a CUDA index.
TORCH_INDEX ?=
PIP_INSTALL := $(BIN)/python -m pip install --progress-bar off --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install system-deps demo test test-fast up down status bench clean-stack

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$$(grep -E '^torch==' requirements.txt)"
	$(PIP_INSTALL) -r requirements.txt -c constraints.txt
	$(PIP_INSTALL) --no-deps -e .
	@touch $@

# The main job end to end on the embedded stack (no Docker). Leaves the stack running.
demo: install
	$(BIN)/shoprank demo

# Debian packages the test suite needs: redis-server (broker for the Celery-executor tests).
# The demo does not need them. Installs with apt-get when missing (root, or sudo).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing redis-server (Debian) for the Celery tests"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# All tests: unit (seconds) + integration/e2e against real servers (minutes).
test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

up: install
	$(BIN)/shoprank stack up

down:
	@test -x $(BIN)/shoprank && $(BIN)/shoprank stack down || true

status: install
	$(BIN)/shoprank stack status

bench: install
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
