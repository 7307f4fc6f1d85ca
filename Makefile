# mmseg_robust: the quick-start commands (and lint).
#   make demo   set up .venv, then train a clean and three robust small models on the
#               synthetic data, evaluate them with SEA and write a report (tools/demo.py)
#   make test   set up .venv, then run the test suite
#   make lint   install the lint tools (requirements/lint.txt) into .venv, then
#               ruff check and ruff format --check (configuration: ruff.toml)
# Each installs what it needs into ./.venv first (idempotent; see tools/setup_env.sh).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=
DEMO_DIR ?= work_dirs/demo
DEMO_ARGS ?=

.PHONY: setup test demo lint clean

setup:
	@VENV=$(VENV) bash tools/setup_env.sh

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist worksteal --durations=15 $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py --work-dir $(DEMO_DIR) $(DEMO_ARGS)

# Lint needs only requirements/lint.txt, not the full stack of `make setup`, so CI
# runs it first and fails fast. The stamp reinstalls when lint.txt changes.
$(VENV)/.lint-installed: requirements/lint.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m pip install -q -r requirements/lint.txt
	@touch $@

lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf work_dirs build *.egg-info
