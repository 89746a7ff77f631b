# featcache — `make features heads` is the whole story; `make help` lists the rest.
# Every setting is a make variable: make features BACKBONE=resnet50 SIZE=160 BATCH=32
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed-featcache
DEV_STAMP := $(VENV)/.installed-featcache-dev
FEATCACHE := $(PY) -m featcache

# ---- settings: empty = featcache's own default (`make settings` lists the table) -----------
# Every default lives in featcache/config.py; a variable set here is passed as its flag.
# stage one (featcache features/path)
DATASET    ?=
DATA_DIR   ?=
BACKBONE   ?=
SIZE       ?=
BATCH      ?=
WEIGHTS    ?=
PREPROCESS ?=
POOLING    ?=
RUNTIME    ?=
PRECISION  ?=
CALIBRATION ?=
DTYPE      ?=
FLIP       ?=
LIMIT      ?=
VARIANT    ?=
CUT        ?=
OUT_DIR    ?=
FEATURES_EXTRA ?=
# stage two (featcache heads/curve; heads also takes DATA_DIR)
HEADS      ?=
WORKERS    ?=
HEADS_EXTRA ?=
# fine-tuning (featcache finetune): a time budget per fit, e.g. BUDGET=30m
BUDGET     ?=

# $(call opt,VAR,--flag): "--flag 'value'" when VAR is set (quoted for the shell, so a
# value may hold spaces: DATASET="My Pictures"); $(call yesno,VAR,--flag): --flag for
# 1/yes/true/on, --no-flag for 0/no/false/off, nothing when empty.
quote = '$(subst ','\'',$(1))'
opt = $(if $(strip $($(1))),$(2) $(call quote,$(strip $($(1)))))
yesno = $(if $(strip $($(1))),$(if $(filter 1 yes true on,$($(1))),$(2),$(if $(filter 0 no false off,$($(1))),--no-$(patsubst --%,%,$(2)),$(error $(1)=$($(1)): use 1 or 0, or leave it empty for the default))))

FEATURE_ARGS = $(call opt,DATASET,--dataset) $(call opt,DATA_DIR,--data-dir) \
  $(call opt,BACKBONE,--backbone) $(call opt,SIZE,--size) $(call opt,BATCH,--batch) \
  $(call opt,WEIGHTS,--weights) $(call opt,PREPROCESS,--preprocess) \
  $(call opt,POOLING,--pooling) $(call opt,RUNTIME,--runtime) \
  $(call opt,PRECISION,--precision) $(call opt,CALIBRATION,--calibration) \
  $(call opt,DTYPE,--dtype) $(call yesno,FLIP,--flip) \
  $(call opt,LIMIT,--limit) $(call opt,VARIANT,--variant) $(call opt,CUT,--cut) \
  $(call opt,OUT_DIR,--out-dir)
# DATA_DIR too: mistakes.png in the report draws CIFAR-10's images from there
HEADS_ARGS = $(call opt,HEADS,--heads) $(call opt,WORKERS,--workers) $(call opt,DATA_DIR,--data-dir) \
  $(call opt,BUDGET,--budget)
# make finetune: HEADS are the frozen heads beside finetune; it runs in one process itself
FINETUNE_ARGS = $(call opt,HEADS,--heads) $(call opt,BUDGET,--budget) $(call opt,DATA_DIR,--data-dir)

# The feature file is a real target: its name comes from the settings (no TensorFlow needed).
FEATURE_FILE := $(shell PYTHONPATH=. $(PYTHON) -m featcache path -q $(FEATURE_ARGS) 2>/dev/null)
ifeq ($(strip $(FEATURE_FILE)),)
# The settings are invalid: run the real command anyway so it prints the one-line error.
FEATURE_FILE := .featcache-invalid-settings
.PHONY: .featcache-invalid-settings
endif
REPORT_DIR   := $(basename $(FEATURE_FILE))
# The folder feature files go to (OUT_DIR, or featcache's default); empty if settings are invalid.
FEATURES_DIR := $(if $(filter .featcache-invalid-settings,$(FEATURE_FILE)),,$(patsubst %/,%,$(dir $(FEATURE_FILE))))

# make finetune's feature file: these settings with CUT, else the backbone's recommended cut
# (`featcache cuts BACKBONE` names it; --cut recommended resolves it). Where the default
# --cut auto already stores it (mobilenet_v2), that is make features' file: no second run.
FINETUNE_FEATURE_ARGS = $(FEATURE_ARGS) $(if $(filter-out none,$(strip $(CUT))),,--cut recommended)
FINETUNE_FILE := $(shell PYTHONPATH=. $(PYTHON) -m featcache path -q $(FINETUNE_FEATURE_ARGS) 2>/dev/null)
ifeq ($(strip $(FINETUNE_FILE)),)
FINETUNE_FILE := .featcache-invalid-finetune-settings
.PHONY: .featcache-invalid-finetune-settings
endif
FINETUNE_DIR := $(basename $(FINETUNE_FILE))
# Its stamps lie beside the report folder (hidden; the report folder is swapped whole, and
# what is hidden in it stays behind): the finetune settings, and "make finetune ran".
FINETUNE_STAMP := $(dir $(FINETUNE_FILE)).$(notdir $(FINETUNE_DIR)).make-finetune
# make export: the best row of make finetune's report when it ran after make heads' (or in
# the same make), else of make heads' report.
EXPORT_FINETUNED := $(or $(filter finetune,$(MAKECMDGOALS)),$(shell test -f $(call quote,$(FINETUNE_STAMP)-done) && { test ! -f $(call quote,$(REPORT_DIR)/results.json) || test $(call quote,$(FINETUNE_STAMP)-done) -nt $(call quote,$(REPORT_DIR)/results.json); } && echo y))

# KERAS_HOME goes to featcache when it is set; unset, it must stay unset (an empty one makes
# Keras write keras.json and download weights into the current folder)
ifneq ($(strip $(KERAS_HOME)),)
export KERAS_HOME
endif

.PHONY: FORCE help install install-dev settings args path features heads finetune curve export test test-fast lint bench bench-quick clean distclean clean-features

help: ## this list
	@echo "featcache — run a pretrained backbone once, cache features, compare heads"
	@echo
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24
	@echo
	@echo "Settings (make VAR=value; empty = featcache's default, \`make settings\` lists them):"
	@echo "  DATASET=$(DATASET) DATA_DIR=$(DATA_DIR) BACKBONE=$(BACKBONE) SIZE=$(SIZE) BATCH=$(BATCH)"
	@echo "  WEIGHTS=$(WEIGHTS) PREPROCESS=$(PREPROCESS) POOLING=$(POOLING) RUNTIME=$(RUNTIME)"
	@echo "  PRECISION=$(PRECISION) DTYPE=$(DTYPE) FLIP=$(FLIP) LIMIT=$(LIMIT) VARIANT=$(VARIANT) CUT=$(CUT) OUT_DIR=$(OUT_DIR)"
	@echo "  HEADS=$(HEADS) WORKERS=$(WORKERS) BUDGET=$(BUDGET)  KERAS_HOME=$(KERAS_HOME)"
	@echo "  -> $(FEATURE_FILE)"

settings: ## the settings table: every flag, its default, cache key and make variable
	@PYTHONPATH=. $(PYTHON) -m featcache settings

args: ## the featcache arguments the make variables give (stage one, then stage two)
	@echo features: $(strip $(FEATURE_ARGS))
	@echo heads: $(strip $(HEADS_ARGS))

path: ## the feature file these settings name
	@echo '$(FEATURE_FILE)'

# One stamp per install: the main job (features, heads, …) installs the package alone;
# test and bench add the dev extra (pytest, Ray) on top, once.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP) ## create .venv and install featcache with its dependencies

install-dev: $(DEV_STAMP) ## also the dev extra (pytest, Ray) that make test and make bench use

# An image folder's listing (every path below it, with its size and modification time) is
# a prerequisite of its feature file: adding, removing or editing an image re-runs stage one,
# which refuses the stale file (rebuild it with FEATURES_EXTRA=--force) or finds it up to
# date. The listing is a file in the report folder that is rewritten only when the folder
# changes; the names are data in it, never make words, so any file or class name works
# (spaces, quotes, $, #, :, %). Registry datasets add nothing here.
DATASET_LISTING := $(if $(strip $(DATASET)),$(if $(shell test -d $(call quote,$(DATASET)) && echo y),$(REPORT_DIR)/.make-folder-listing))

features: $(FEATURE_FILE) ## stage one: cache backbone features (no-op when up to date)

# (touched after a run: a folder touched but not changed, found up to date, is not
# checked again on every make)
$(FEATURE_FILE): $(DATASET_LISTING) | $(STAMP)
	$(FEATCACHE) features $(FEATURE_ARGS) $(FEATURES_EXTRA)
	@test ! -f '$@' || touch '$@'

$(DATASET_LISTING): FORCE
	@mkdir -p '$(@D)'; find $(call quote,$(DATASET)) -printf '%P\t%s\t%T@\n' | LC_ALL=C sort > '$@.new'; \
	  if cmp -s '$@.new' '$@'; then rm -f '$@.new'; else mv -f '$@.new' '$@'; fi

heads: $(REPORT_DIR)/results.json ## stage two: train and compare heads, write the report

# The heads settings are a prerequisite too: `make heads HEADS=logreg` after a full run re-runs.
HEADS_SETTINGS := $(REPORT_DIR)/.make-heads-settings
# (WORKERS is not a setting of the results: any count gives the same report.)
$(HEADS_SETTINGS): FORCE
	@mkdir -p $(@D); echo '$(HEADS) $(HEADS_EXTRA)$(if $(BUDGET), budget=$(BUDGET))' | cmp -s - $@ || echo '$(HEADS) $(HEADS_EXTRA)$(if $(BUDGET), budget=$(BUDGET))' > $@

$(REPORT_DIR)/results.json: $(FEATURE_FILE) $(HEADS_SETTINGS) | $(STAMP)
	$(FEATCACHE) heads $(FEATURE_FILE) $(HEADS_ARGS) $(HEADS_EXTRA)

finetune: $(FINETUNE_STAMP)-done ## fine-tune the top blocks at the recommended cut (or CUT=) beside the frozen heads; BUDGET=30m

# (CUT given: the same file as `make features`, whose rule makes it)
ifneq ($(FINETUNE_FILE),$(FEATURE_FILE))
$(FINETUNE_FILE): $(DATASET_LISTING) | $(STAMP)
	$(FEATCACHE) features $(FINETUNE_FEATURE_ARGS) $(FEATURES_EXTRA)
	@test ! -f '$@' || touch '$@'
endif

$(FINETUNE_STAMP)-settings: FORCE
	@mkdir -p $(@D); echo '$(HEADS) $(BUDGET) $(HEADS_EXTRA)' | cmp -s - $@ || echo '$(HEADS) $(BUDGET) $(HEADS_EXTRA)' > $@

$(FINETUNE_STAMP)-done: $(FINETUNE_FILE) $(FINETUNE_STAMP)-settings | $(STAMP)
	$(FEATCACHE) finetune $(FINETUNE_FILE) $(FINETUNE_ARGS) $(HEADS_EXTRA)
	@touch '$@'

curve: $(FEATURE_FILE) | $(STAMP) ## label-efficiency curve: accuracy vs labelled examples per class
	$(FEATCACHE) curve $(FEATURE_FILE) $(call opt,HEADS,--heads)

export: $(if $(EXPORT_FINETUNED),$(if $(filter finetune,$(MAKECMDGOALS)),$(FINETUNE_STAMP)-done),$(REPORT_DIR)/results.json) | $(STAMP) ## one model: raw images -> classes (best head of make heads', or of a later make finetune's report; FORMAT=keras|savedmodel|tflite)
	$(FEATCACHE) export $(if $(EXPORT_FINETUNED),$(FINETUNE_FILE),$(FEATURE_FILE)) $(if $(HEAD),--head $(HEAD)) $(if $(FORMAT),--format $(FORMAT))

# test: one pytest worker per core (pytest-xdist), each test file on one worker (module
# fixtures run once), the files in collection order (--no-loadscope-reorder: xdist would
# otherwise start the files with the most tests first, and the longest files, which hold
# few tests, last; tests/conftest.py puts the longest first); TEST_WORKERS=0 runs the
# suite in one process.
TEST_WORKERS ?= logical
test: $(DEV_STAMP) ## run the test suite (real-data tests run when ../shared or FEATCACHE_REAL_DATA is there)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# lint: ruff (style, unused names, import order) and the import contracts of pyproject.toml
# (the rooms' layer order, no cycles, the stage-two boundary, h5py only in featcache.cache).
lint: $(DEV_STAMP) ## ruff + the import-layer contracts (lint-imports)
	$(VENV)/bin/ruff check featcache tests benchmarks
	$(VENV)/bin/lint-imports

bench: $(DEV_STAMP) ## side-by-side benchmarks -> BENCHMARKS.md (minutes)
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: $(DEV_STAMP) ## the one-minute smoke version of `make bench` -> bench-out/
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

clean: ## remove caches and build leftovers (keeps features/ and .venv)
	rm -rf .pytest_cache build *.egg-info bench-out
	find . -name __pycache__ -prune -not -path './$(VENV)/*' -exec rm -rf {} +

clean-features: ## delete every cached feature file and report in the features folder (hours of work!)
	@test -n '$(FEATURES_DIR)' || { echo "make: the settings are invalid, so the features folder is unknown" >&2; exit 2; }
	rm -rf $(FEATURES_DIR)/*.h5 $(FEATURES_DIR)/*.h5.partial $(FEATURES_DIR)/*.lock $(FEATURES_DIR)/.*.make-finetune-* $(filter-out $(FEATURES_DIR)/README.md,$(wildcard $(FEATURES_DIR)/*/))

distclean: clean ## also remove .venv
	rm -rf $(VENV)
