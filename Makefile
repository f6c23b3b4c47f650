# `make test` and `make bench` each set up .venv by themselves on a fresh clone.
# Without a GPU, torch is pinned to the CPU wheel first so pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CPU_TORCH ?= torch==2.13.0
# The Triton of the lent GPU machines' image: tests compile every kernel with it too (no GPU needed).
GPU_IMAGE_TRITON ?= triton==3.6.0
GPU_IMAGE_TRITON_DIR := .triton-gpu-image
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

$(GPU_IMAGE_TRITON_DIR)/.installed: $(STAMP) Makefile
	rm -rf $(GPU_IMAGE_TRITON_DIR)
	$(PY) -m pip install --quiet --no-deps --target $(GPU_IMAGE_TRITON_DIR) "$(GPU_IMAGE_TRITON)"
	touch $@

test: $(STAMP) $(GPU_IMAGE_TRITON_DIR)/.installed
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d build/site

# Results go under build/ (ignored): the committed records change only with `clisonix-gpu bench --publish`.
demo: $(STAMP)
	$(VENV)/bin/clisonix-gpu demo --out build/demo

bench: $(STAMP)
	$(VENV)/bin/clisonix-gpu bench --out build/bench

info: $(STAMP)
	$(VENV)/bin/clisonix-gpu info

clean:
	rm -rf $(VENV) $(GPU_IMAGE_TRITON_DIR) .pytest_cache .benchmarks
