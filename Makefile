# `make test` and `make bench` each set up .venv by themselves on a fresh clone.
# Without a GPU, torch is pinned to the CPU wheel first so pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: test bench lint docs info demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),)
	$(PY) -m pip install --quiet "$(CPU_TORCH)" || \
	  $(PY) -m pip install --quiet "$(CPU_TORCH)" --index-url https://download.pytorch.org/whl/cpu
endif
	$(PY) -m pip install --quiet -e ".[test,bench,docs]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d build/site

demo: $(STAMP)
	$(VENV)/bin/clisonix-gpu demo --out bench/results

bench: $(STAMP)
	$(VENV)/bin/clisonix-gpu bench

info: $(STAMP)
	$(VENV)/bin/clisonix-gpu info

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
