# LibraGHM: two commands do all the set-up.
#   make demo   creates .venv if missing, trains the demo config on the built-in dataset, evaluates it
#   make test   creates .venv if missing, runs the test suite
PYTHON ?= python3.10
VENV := .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/Shapes-Detection/faster_rcnn_small_R_FPN.yaml
DEMO_OUTPUT ?= output/demo

.PHONY: env demo test bench

$(VENV)/.installed: requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

env: $(VENV)/.installed

demo: env
	$(PY) train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)

test: env
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest tests -q -p no:cacheprovider

bench: env
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done
