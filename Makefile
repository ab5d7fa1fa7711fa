# `make demo` and `make test` each do all the set-up they need on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to a known-good pair; override for another CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO ?= demo-out

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps 'lvis==0.5.3'
	touch $@

demo: setup
	bash scripts/demo.sh $(DEMO)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m cocolvis.benchmark
	$(BIN)/python -m ess.benchmark

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
