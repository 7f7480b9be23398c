# Data recipes, included by the top-level Makefile (`include data_prep/data.mk`).
#
#   make data                                     built-in corpus (Python stdlib) -> data/stdlib
#   make data CORPUS='path/*.jsonl' TOKENIZER=path/tokenizer.json OUT=dir
#   make tokenizer                                BPE (VOCAB_SIZE=8192) on the corpus -> $(TOKENIZER_OUT)
#
# preprocess is resumable and skips a finished dataset, so re-running `make data` is cheap.
VENV ?= .venv
STDLIB_CORPUS ?= data/corpus/stdlib.jsonl
DATA_WORKERS ?= 2
VOCAB_SIZE ?= 8192
TOKENIZER_OUT ?= data/tokenizer/bpe-$(VOCAB_SIZE).json
PREPROCESS_FLAGS ?=

DATA_INPUTS = $(if $(CORPUS),$(CORPUS),$(STDLIB_CORPUS))
DATA_OUT = $(if $(OUT),$(OUT),data/stdlib)
DATA_TOKENIZER = $(if $(TOKENIZER),$(TOKENIZER),byte)
# the built-in corpus has only ~650 documents: a larger val share gives a usable val split
DATA_FLAGS = $(if $(CORPUS),,--val-fraction 0.02)

.PHONY: data tokenizer stdlib-corpus

$(STDLIB_CORPUS): data_prep/build_stdlib_corpus.py
	$(VENV)/bin/python data_prep/build_stdlib_corpus.py --out $@

stdlib-corpus: $(STDLIB_CORPUS)

data: install $(if $(CORPUS),,$(STDLIB_CORPUS))
	$(VENV)/bin/hpcllm preprocess $(DATA_INPUTS) --out $(DATA_OUT) --tokenizer $(DATA_TOKENIZER) \
	    --workers $(DATA_WORKERS) $(DATA_FLAGS) $(PREPROCESS_FLAGS)

tokenizer: install $(if $(CORPUS),,$(STDLIB_CORPUS))
	$(VENV)/bin/hpcllm tokenizer train $(DATA_INPUTS) --vocab-size $(VOCAB_SIZE) --out $(TOKENIZER_OUT)
