# Scarce: every target sets up .venv idempotently (fast when already done).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
DATA ?= ../shared/data/nist_rpe
OUT ?= demo-out
MINUTES ?= 4
FUZZ_EXAMPLES ?= 5000
export OMP_WAIT_POLICY ?= PASSIVE
export NO_ALBUMENTATIONS_UPDATE ?= 1

.PHONY: setup test slow faults lint demo bench bench-setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,onnx,bioimageio,zarr,napari]'
	-bash scripts/install_gui_libs.sh
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

slow: setup
	$(BIN)/python -m pytest -q -m slow

# kill -9 / signal / DDP / disk-full tests on real subprocesses, then the reader fuzz tests
# with a larger budget (docs/reliability.md lists what they prove)
faults: setup
	$(BIN)/python -m pytest -q -m faults
	SCARCE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz_readers.py

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

demo: setup
	$(BIN)/scarce demo --data $(DATA) --out $(OUT) --minutes $(MINUTES)

bench-setup: setup
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,onnx,bench]'

bench: bench-setup
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/readers.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/predict.py
	$(BIN)/python benchmarks/align.py

clean:
	rm -rf $(VENV) $(OUT)
