# `make test` and `make demo` each set up .venv on first use (torch first, then the project with its dev extras).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.taillor-installed
TORCH_SPEC ?= torch==2.14.1
# `make demo` is a first command: the quick run (about 4 min on 2 cores). `make demo DEMO_ARGS=` runs the full one.
DEMO_ARGS ?= --quick

.PHONY: setup test demo bench check-kernels clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" numpy
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/taillor info
	$(BIN)/python -m pytest -q
	$(BIN)/taillor check-kernels --arch sm_80,sm_90

demo: $(STAMP)
	$(BIN)/taillor demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/taillor bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info taillor/_C*.so .pytest_cache .benchmarks
