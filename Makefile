# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Offline model, books and tokenized caches live here (git-ignored).
export LONGEXT_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install materials demo test test-all test-gpu wheelhouse bench bench-quick toy-base lint clean

install: $(VENV)/.installed

# torch goes first and alone, pinned: everything after it sees torch already satisfied and can
# never pull an unpinned (multi-GB CUDA) build. On a GPU machine the same pin resolves to CUDA.
$(VENV)/.installed: requirements.txt requirements-extra.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt -r requirements-extra.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

materials: install
	$(BIN)/longext models prepare all

demo: materials
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

# The import-circle check first (scripts/import_cycles.py: exit 1 on any circle among longext/ modules or its parts).
test: install
	$(BIN)/python scripts/import_cycles.py
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: install
	$(BIN)/python -m pytest -q

# The GPU tier (tests/gpu, CUDA paths against CPU/fp32 references); skipped without CUDA. docs/gpu.md
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests/gpu

# Every wheel longext needs beyond the node's own torch, for its Python and platform, installable with
# `pip install --no-index --find-links wheelhouse -e .` (docs/gpu.md). WHEELHOUSE_SKIP: packages the node's image has.
WHEELHOUSE ?= wheelhouse
WHEEL_PYTHON ?= 3.12
WHEEL_GLIBC ?= 2.28
WHEELHOUSE_SKIP ?=
wheelhouse: install
	$(BIN)/python scripts/wheelhouse.py --out $(WHEELHOUSE) --python-version $(WHEEL_PYTHON) --glibc $(WHEEL_GLIBC) \
		$(if $(strip $(WHEELHOUSE_SKIP)),--skip $(WHEELHOUSE_SKIP))

# Benchmarks (docs/bench.md): one result per case committed under bench/results/ (a current one is not re-run),
# logs and run folders under bench-runs/, page in docs/benchmarks.md.
# Long jobs: run them niced on a shared machine, e.g. `nice -n 19 make bench`.
bench: materials
	$(BIN)/longext bench all

bench-quick: materials
	$(BIN)/longext bench all --quick

# Re-pretrain the committed toy base (bench/toy-base; seeded, one thread as it was built: 29 min measured on the
# shared 2-core CPU). `make bench` does not need it.
toy-base: materials
	$(BIN)/python scripts/toy_base.py --out bench/toy-base --threads 1

lint: install
	$(BIN)/python -m compileall -q longext tests

clean:
	rm -rf runs bench-runs .pytest_cache
