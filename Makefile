# LibraGHM: two commands do all the set-up.
#   make demo   creates .venv if missing, trains Libra Faster R-CNN on the built-in dataset, evaluates it
#               and draws its detections on val images (output/demo/vis)
#   make test   creates .venv if missing, runs the test suite
PYTHON ?= python3.10
VENV := .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/Shapes-Detection/libra_faster_rcnn.yaml
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
	$(PY) demo/demo.py --config-file $(DEMO_CONFIG) --input shapes_val --max-images 8 \
		--output $(DEMO_OUTPUT)/vis --opts MODEL.WEIGHTS $(DEMO_OUTPUT)/model_final.pth

test: env
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest tests -q -p no:cacheprovider

bench: env
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done
