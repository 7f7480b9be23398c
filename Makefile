# hpcllm: `make demo` and `make test` work from a fresh clone on Debian/Ubuntu as root.
# Every target is idempotent; `install` takes about a second once done (stamp in .venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HPCLLM := $(VENV)/bin/hpcllm
PYTEST_ARGS ?=

.PHONY: all install demo test bench clean distclean help gpu-check

all: help

help:
	@echo "make install   system packages (root), .venv, torch, deps, Horovod 0.28.1 from source"
	@echo "make demo      install, build the stdlib corpus, preprocess, train on 2 MPI ranks, sample"
	@echo "make test      install, then the whole test suite (unit, MPI, Slurm)"
	@echo "make data      prepare the built-in corpus (or CORPUS='glob' TOKENIZER=path OUT=dir)"
	@echo "make tokenizer train a BPE tokenizer on the built-in corpus (or CORPUS=...)"
	@echo "make bench     run every benchmark in benchmarks/ (tables + benchmarks/results/*.json)"
	@echo "make gpu-check on a CUDA machine: cuda tests, train/generate measured -> benchmarks/results (GPU_CHECK_ARGS=--quick)"
	@echo "make clean     remove generated data, runs and caches (keeps .venv); distclean also .venv"

install:
	@bash scripts/install.sh

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: install
	@bash scripts/demo.sh

bench: install
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

# No install first: the GPU machine has its own torch and no network (scripts/gpu_check.py)
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	@$(GPU_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf data/ runs/ build/ dist/ *.egg-info .pytest_cache benchmarks/results/*.tmp
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# data / tokenizer targets: data_prep/data.mk
-include data_prep/data.mk
