# mmseg_robust: the two quick-start commands.
#   make demo   set up .venv, then train a clean and three robust small models on the
#               synthetic data, evaluate them with SEA and write a report (tools/demo.py)
#   make test   set up .venv, then run the test suite
# Both install what they need into ./.venv first (idempotent; see tools/setup_env.sh).

VENV ?= .venv
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

lint: setup
	$(PY) -m flake8 mmseg_robust tools tests benchmarks configs

clean:
	rm -rf work_dirs build *.egg-info
