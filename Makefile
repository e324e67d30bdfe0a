# Two commands set up and run everything: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,text]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/branchnet demo

# Tests use tiny models: one thread each is faster, and immune to a busy machine.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_demo.py
	$(BIN)/python benchmarks/bench_branch_training.py
	$(BIN)/python benchmarks/bench_cache_memory.py
	$(BIN)/python benchmarks/bench_specialization.py
	$(BIN)/python benchmarks/bench_vbranch.py
	$(BIN)/python benchmarks/bench_plastic.py
	$(BIN)/python benchmarks/bench_text.py
	$(BIN)/python benchmarks/bench_tree_paths.py

clean:
	rm -rf $(VENV) runs .pytest_cache build src/*.egg-info
