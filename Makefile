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
# evaluate both heads (tiny preset), then the analyses; it closes with which head won, by how much
# and on which classes (`bench compare`), and the time each step took. Re-running resumes the builds.
# $(call step,NAME,COMMAND): run COMMAND and record its wall time under NAME in $(DEMO)/steps.tsv.
step = start=$$(date +%s); $(2) || exit 1; printf '%s\t%s\n' "$(1)" "$$(( $$(date +%s) - start ))" >> $(DEMO)/steps.tsv
SYNTH := $(DEMO)/synth/annotations
# The timing table at three class counts (a call's arguments cannot hold a comma, a variable's value can).
DEMO_TIMING := --preset cpu --classes 19,1284,10000 --heads softmax,ess --repeats 3 --warmup 1

demo: setup
	@mkdir -p $(DEMO) && rm -f $(DEMO)/steps.tsv
	@$(call step,synthetic data,$(BIN)/cocolvis synth --out $(DEMO)/synth)
	@$(call step,build train,$(BIN)/cocolvis build --lvis $(SYNTH)/lvis_v1_train.json \
	    --coco $(SYNTH)/stuff_train2017.json --images-root $(DEMO)/synth/images --out $(DEMO)/train)
	@$(call step,build val,$(BIN)/cocolvis build --lvis $(SYNTH)/lvis_v1_val.json \
	    --coco $(SYNTH)/stuff_train2017.json --coco $(SYNTH)/stuff_val2017.json \
	    --images-root $(DEMO)/synth/images --out $(DEMO)/val)
	@for head in softmax ess; do \
	    rm -rf $(DEMO)/runs/$$head; \
	    $(call step,train $$head,$(BIN)/ess train --preset tiny --head $$head --data $(DEMO)/train \
	        --out $(DEMO)/runs/$$head); \
	    $(call step,evaluate $$head,$(BIN)/ess eval --run $(DEMO)/runs/$$head --data $(DEMO)/val --save-predictions); \
	done
	@$(call step,bench longtail,$(BIN)/bench longtail --data $(DEMO)/train --out $(DEMO)/bench/longtail)
	@$(call step,bench topn-miou,$(BIN)/bench topn-miou --eval $(DEMO)/runs/softmax/eval \
	    --eval $(DEMO)/runs/ess/eval --out $(DEMO)/bench/topn)
	@$(call step,bench timing,$(BIN)/bench timing $(DEMO_TIMING) --out $(DEMO)/bench/timing)
	@$(call step,bench embeddings,$(BIN)/bench embeddings --run $(DEMO)/runs/ess --data $(DEMO)/val \
	    --out $(DEMO)/bench/embeddings)
	@echo "Figures:"; for f in $(DEMO)/bench/*/*.png; do echo "  $$f"; done
	@echo "Notebook: BENCH_DIR=$(DEMO)/bench jupyter notebook notebooks/analysis.ipynb"
	@echo
	@$(call step,bench compare,$(BIN)/bench compare --eval $(DEMO)/runs/softmax/eval \
	    --eval $(DEMO)/runs/ess/eval --out $(DEMO)/bench/compare)
	@echo; echo "Time per step (seconds):"; \
	    awk -F'\t' '{printf "  %-18s %5d\n", $$1, $$2; total += $$2} END {printf "  %-18s %5d\n", "total", total}' \
	    $(DEMO)/steps.tsv

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
