# featcache — `make features heads` is the whole story; `make help` lists the rest.
# Every setting is a make variable: make features BACKBONE=resnet50 SIZE=160 BATCH=32
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed-featcache
FEATCACHE := $(PY) -m pipeline

# ---- stage one settings --------------------------------------------------------------
DATASET    ?= cifar10
DATA_DIR   ?= data
BACKBONE   ?= mobilenet_v2
SIZE       ?=
BATCH      ?= 64
WEIGHTS    ?= imagenet
PREPROCESS ?=
RUNTIME    ?=
PRECISION  ?=
DTYPE      ?= float32
FLIP       ?= 1
LIMIT      ?=
VARIANT    ?=
OUT_DIR    ?= features
FEATURES_EXTRA ?=
# ---- stage two settings --------------------------------------------------------------
HEADS      ?=
WORKERS    ?=
HEADS_EXTRA ?=

FEATURE_ARGS = --dataset $(DATASET) --data-dir $(DATA_DIR) --backbone $(BACKBONE) \
  $(if $(SIZE),--size $(SIZE)) --batch $(BATCH) --weights $(WEIGHTS) \
  $(if $(PREPROCESS),--preprocess $(PREPROCESS)) $(if $(RUNTIME),--runtime $(RUNTIME)) \
  $(if $(PRECISION),--precision $(PRECISION)) --dtype $(DTYPE) \
  $(if $(filter 1 yes true,$(FLIP)),--flip) $(if $(LIMIT),--limit $(LIMIT)) \
  $(if $(VARIANT),--variant $(VARIANT)) --out-dir $(OUT_DIR)

# The feature file is a real target: its name comes from the settings (no TensorFlow needed).
FEATURE_FILE := $(shell PYTHONPATH=. $(PYTHON) -m pipeline path -q $(FEATURE_ARGS) 2>/dev/null)
ifeq ($(strip $(FEATURE_FILE)),)
# The settings are invalid: run the real command anyway so it prints the one-line error.
FEATURE_FILE := .featcache-invalid-settings
.PHONY: .featcache-invalid-settings
endif
REPORT_DIR   := $(basename $(FEATURE_FILE))

export KERAS_HOME

.PHONY: FORCE help install features heads curve export test test-fast bench bench-quick clean distclean clean-features

help: ## this list
	@echo "featcache — run a pretrained backbone once, cache features, compare heads"
	@echo
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24
	@echo
	@echo "Settings (make VAR=value): DATASET=$(DATASET) DATA_DIR=$(DATA_DIR) BACKBONE=$(BACKBONE)"
	@echo "  SIZE=$(SIZE) BATCH=$(BATCH) WEIGHTS=$(WEIGHTS) PREPROCESS=$(PREPROCESS) FLIP=$(FLIP)"
	@echo "  RUNTIME=$(RUNTIME) PRECISION=$(PRECISION) DTYPE=$(DTYPE) LIMIT=$(LIMIT) VARIANT=$(VARIANT) HEADS=$(HEADS)"
	@echo "  WORKERS=$(WORKERS) (empty: featcache heads' default, the cores available)"
	@echo "  KERAS_HOME=$(KERAS_HOME)  -> $(FEATURE_FILE)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP) ## create .venv and install featcache with its dependencies

# An image folder's files and sub-folders are prerequisites of its feature file: adding,
# removing or editing an image re-runs stage one, which refuses the stale file (rebuild it
# with FEATURES_EXTRA=--force) or finds it up to date. Registry datasets add nothing here.
DATASET_FILES := $(if $(wildcard $(DATASET)/.),$(shell find $(DATASET) -print 2>/dev/null))

features: $(FEATURE_FILE) ## stage one: cache backbone features (no-op when up to date)

$(FEATURE_FILE): $(DATASET_FILES) | $(STAMP)
	$(FEATCACHE) features $(FEATURE_ARGS) $(FEATURES_EXTRA)

heads: $(REPORT_DIR)/results.json ## stage two: train and compare heads, write the report

# The heads settings are a prerequisite too: `make heads HEADS=logreg` after a full run re-runs.
HEADS_SETTINGS := $(REPORT_DIR)/.make-heads-settings
# (WORKERS is not a setting of the results: any count gives the same report.)
$(HEADS_SETTINGS): FORCE
	@mkdir -p $(@D); echo '$(HEADS) $(HEADS_EXTRA)' | cmp -s - $@ || echo '$(HEADS) $(HEADS_EXTRA)' > $@

$(REPORT_DIR)/results.json: $(FEATURE_FILE) $(HEADS_SETTINGS) | $(STAMP)
	$(FEATCACHE) heads $(FEATURE_FILE) $(if $(HEADS),--heads $(HEADS)) $(if $(WORKERS),--workers $(WORKERS)) $(HEADS_EXTRA)

curve: $(FEATURE_FILE) | $(STAMP) ## label-efficiency curve: accuracy vs labelled examples per class
	$(FEATCACHE) curve $(FEATURE_FILE) $(if $(HEADS),--heads $(HEADS))

export: $(REPORT_DIR)/results.json | $(STAMP) ## one model: raw images -> classes (best head; FORMAT=keras|savedmodel|tflite)
	$(FEATCACHE) export $(FEATURE_FILE) $(if $(HEAD),--head $(HEAD)) $(if $(FORMAT),--format $(FORMAT))

test: $(STAMP) ## run the test suite (real-data tests run when ../shared or FEATCACHE_REAL_DATA is there)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP) ## side-by-side benchmarks -> BENCHMARKS.md (minutes)
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: $(STAMP) ## the one-minute smoke version of `make bench`
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

clean: ## remove caches and build leftovers (keeps features/ and .venv)
	rm -rf .pytest_cache build *.egg-info bench-out
	find . -name __pycache__ -prune -not -path './$(VENV)/*' -exec rm -rf {} +

clean-features: ## delete every cached feature file and report in $(OUT_DIR)/ (hours of work!)
	rm -rf $(OUT_DIR)/*.h5 $(OUT_DIR)/*.h5.partial $(OUT_DIR)/*.lock $(filter-out $(OUT_DIR)/README.md,$(wildcard $(OUT_DIR)/*/))

distclean: clean ## also remove .venv
	rm -rf $(VENV)
