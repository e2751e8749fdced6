# Project tasks. Everything runs through the venv's interpreter; no activation needed.
#   make setup   create/refresh .venv (scripts/setup-env.sh), stamped: instant when done
#   make test    setup, then lint (ruff, mypy), then the test suite
#   make lint    ruff and mypy over the tree (configured in pyproject.toml)
#   make eval    setup, a small synthetic dataset (made once), then an accuracy run
#   make bench   setup, then every benchmark in BENCHES
#   make clean   remove caches and build outputs (keeps .venv and the region decoder);
#                distclean removes .venv and preprocess/_jpegregion-*.so too

SHELL       := /bin/bash
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.setup-stamp
SETUP_DEPS  := scripts/setup-env.sh setup.cfg pyproject.toml setup.py requirements-test.txt preprocess/_jpegregion.c
# `make test` installs the Ray extra so the Ray tests run in CI.
SETUP_FLAGS ?= --ray

PYTEST_FLAGS ?= -q -ra -p no:cacheprovider --timeout=300
TESTS        ?= tests

# EVAL_CONTAINER=tar|wds|parquet: the same images in that container (make-dataset --container)
EVAL_CONTAINER ?=
EVAL_DATA    ?= .cache/synthetic-val$(if $(EVAL_CONTAINER),-$(EVAL_CONTAINER))
EVAL_INPUT    = $(if $(filter tar,$(EVAL_CONTAINER)),$(EVAL_DATA)/ILSVRC2012_img_val.tar --labels $(EVAL_DATA)/val_label.txt,$(EVAL_DATA))
EVAL_IMAGES  ?= 400
EVAL_CLASSES ?= 50
EVAL_MODEL   ?= resnext50_32x4d
EVAL_BACKEND ?= cpu
EVAL_WORKERS ?= 1
EVAL_BATCH   ?= 25
EVAL_JSON    ?= .cache/eval-report.json
# --threads 2: the one decode worker is busy ~5% of the time on the CPU backend, so the model
# gets both cores (the default gives torch only the cores the workers leave: 1 here)
EVAL_FLAGS   ?= --threads 2

# Benchmarks to run, one python file each; default every bench/bench_*.py (helpers such
# as bench/_common.py and long runs such as bench/soak.py are left out unless named).
BENCHES      ?= $(sort $(wildcard bench/bench_*.py))
BENCH_FLAGS  ?=

.PHONY: setup lint test eval bench clean distclean

setup: $(STAMP)

$(STAMP): $(SETUP_DEPS)
	VENV=$(VENV) bash scripts/setup-env.sh $(SETUP_FLAGS)
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# pytest exit 5 means "no tests collected": reported, not treated as a failure.
test: setup lint
	@rc=0; $(PY) -m pytest $(PYTEST_FLAGS) $(TESTS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; rc=0; fi; \
	exit $$rc

eval: setup $(EVAL_DATA)
	@mkdir -p $(dir $(EVAL_JSON))
	$(PY) bin/run-eval --data $(EVAL_INPUT) --model $(EVAL_MODEL) --backend $(EVAL_BACKEND) \
		--workers $(EVAL_WORKERS) --batch-size $(EVAL_BATCH) --json $(EVAL_JSON) $(EVAL_FLAGS)

# Made once: the folder's existence is the stamp; a failed run leaves no folder behind.
$(EVAL_DATA): | $(STAMP)
	@mkdir -p $(dir $(EVAL_DATA))
	$(PY) bin/make-dataset $@ --images $(EVAL_IMAGES) --classes $(EVAL_CLASSES) \
		$(if $(EVAL_CONTAINER),--container $(EVAL_CONTAINER) --layout flat) || { rm -rf $@; exit 1; }

bench: setup
	@if [ -z "$(strip $(BENCHES))" ]; then echo "make bench: no benchmarks in bench/ yet"; fi
	@set -e; for b in $(BENCHES); do echo "== $$b"; $(PY) $$b $(BENCH_FLAGS); done

clean:
	rm -rf .cache build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) preprocess/_jpegregion-*.so

# ---- aarch64 (issue 14) ------------------------------------------------------------------------
# The region decoder's resize on aarch64, by emulation: cross-compiled with its test driver
# (tests/native/region_check.c), run under qemu-aarch64, NEON and scalar pixels compared bit for
# bit with the x86_64 build's. Installs gcc-aarch64-linux-gnu, libjpeg62-turbo-dev:arm64 and
# qemu-user via apt-get when root. Uses the main venv's Python to write the test JPEGs.
.PHONY: check-aarch64
check-aarch64: setup
	PYTHON=$(PY) bash scripts/check-aarch64.sh

# ---- the reference's stack (issue 14, docs/compat.md) ------------------------------------------
# .venv-compat: Python 3.9 (pyenv; else the oldest Python 3 found, with a notice), torch 2.0.1,
# torchvision 0.15.2, numpy<2 (requirements-compat.txt), stock Pillow, no Ray. Stamped like setup.
#   make setup-compat   create/refresh .venv-compat (scripts/setup-compat.sh)
#   make test-compat    setup-compat, then the whole suite on that stack
COMPAT_VENV  ?= .venv-compat
COMPAT_PY    := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.setup-stamp
COMPAT_DEPS  := scripts/setup-compat.sh scripts/setup-env.sh setup.cfg pyproject.toml requirements-compat.txt \
                preprocess/_jpegregion.c

.PHONY: setup-compat test-compat
setup-compat: $(COMPAT_STAMP)

$(COMPAT_STAMP): $(COMPAT_DEPS)
	VENV=$(COMPAT_VENV) bash scripts/setup-compat.sh
	@touch $@

test-compat: setup-compat
	@rc=0; $(COMPAT_PY) -m pytest $(PYTEST_FLAGS) $(TESTS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-compat: pytest collected no tests"; rc=0; fi; \
	exit $$rc
