# `make demo` and `make test` each do all the set-up they need on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to a known-good pair; override for another CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# faiss build: cpu (faiss-cpu) or gpu (faiss-gpu, the official CUDA 12 build for compute capability 7.0 to 9.0,
# Linux x86_64; docs/gpu.md): `make setup FAISS=gpu`.
FAISS ?= cpu
DEMO ?= demo-out
GPU_CHECK ?= gpu-check-out

.PHONY: setup demo test bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[dev,$(FAISS)]'
	$(BIN)/pip install --no-deps 'lvis==0.5.3'
	touch $@

# The whole pipeline on the embedded synthetic data: synth, build train and val, train and
# evaluate both heads (tiny preset), then the four analyses; it closes with which head won, by
# how much and on which classes (`bench compare`). Re-running resumes the builds.
demo: setup
	$(BIN)/cocolvis synth --out $(DEMO)/synth
	$(BIN)/cocolvis build --lvis $(DEMO)/synth/annotations/lvis_v1_train.json \
	    --coco $(DEMO)/synth/annotations/stuff_train2017.json \
	    --images-root $(DEMO)/synth/images --out $(DEMO)/train
	$(BIN)/cocolvis build --lvis $(DEMO)/synth/annotations/lvis_v1_val.json \
	    --coco $(DEMO)/synth/annotations/stuff_train2017.json \
	    --coco $(DEMO)/synth/annotations/stuff_val2017.json \
	    --images-root $(DEMO)/synth/images --out $(DEMO)/val
	for head in softmax ess; do \
	    rm -rf $(DEMO)/runs/$$head && \
	    $(BIN)/ess train --preset tiny --head $$head --data $(DEMO)/train --out $(DEMO)/runs/$$head && \
	    $(BIN)/ess eval --run $(DEMO)/runs/$$head --data $(DEMO)/val --save-predictions || exit 1; \
	done
	$(BIN)/bench longtail --data $(DEMO)/train --out $(DEMO)/bench/longtail
	$(BIN)/bench topn-miou --eval $(DEMO)/runs/softmax/eval --eval $(DEMO)/runs/ess/eval --out $(DEMO)/bench/topn
	$(BIN)/bench timing --preset cpu --heads softmax,ess --repeats 3 --warmup 1 --out $(DEMO)/bench/timing
	$(BIN)/bench embeddings --run $(DEMO)/runs/ess --data $(DEMO)/val --out $(DEMO)/bench/embeddings
	@echo "Figures:"; for f in $(DEMO)/bench/*/*.png; do echo "  $$f"; done
	@echo "Notebook: BENCH_DIR=$(DEMO)/bench jupyter notebook notebooks/analysis.ipynb"
	@echo
	$(BIN)/bench compare --eval $(DEMO)/runs/softmax/eval --eval $(DEMO)/runs/ess/eval --out $(DEMO)/bench/compare

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m benchmarks.build
	$(BIN)/python -m benchmarks.loss_step
	$(BIN)/python -m benchmarks.analysis

# On a GPU machine (after `make setup FAISS=gpu`): the CUDA tests, both heads trained under torchrun with mixed
# precision and evaluated, and the paper timing, in under 8 minutes; all in $(GPU_CHECK)/gpu-report.md
# (docs/gpu.md). Without a CUDA device it stops with one line and exit status 2.
gpu-check: setup
	$(if $(GPU_CHECK_BLOCKER),$(error $(GPU_CHECK_BLOCKER)))
	$(BIN)/python -m bench.gpu_check --out $(GPU_CHECK)

# Why this machine cannot run gpu-check, or nothing; asked only when that target runs.
GPU_CHECK_BLOCKER = $(shell $(BIN)/python -m bench.gpu_check --why-not)

clean:
	rm -rf $(VENV) $(DEMO) $(GPU_CHECK) .pytest_cache
