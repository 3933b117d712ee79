# The two set-up commands in README.md: `make demo` (main job on builtin:digits) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch is pinned to the CPU build that is installed first; the rest resolves around it.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/evar demo --out runs/demo

# Tests use tiny models: one thread each avoids oversubscribing small machines (the DDP test runs 2 processes).
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Latency tables (benchmarks/results/latency.{json,md} + PNGs): d16 dense vs pruned on onnxruntime CPU, PyTorch
# eager vs the exported graphs, digits; models and exports are cached in runs/bench. BENCH_ARGS=--iters 5 etc.
.PHONY: bench
bench: setup
	$(PY) benchmarks/latency.py $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check evar export runtime tests

clean:
	rm -rf runs .pytest_cache
