# Every target sets up what it needs, from nothing, and is safe to run again.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: a bare or open-ended torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# dask-cuda unpinned backtracks to releases that cannot install; import needs cuda-bindings.
GPU_PINS := "dask-cuda==26.10.*" "cuda-bindings==13.*"
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
PYTEST_ARGS ?=
# The labextension build calls `jupyter labextension build`: it must find the venv's jupyter.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: lab test demo bench lint install system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Python packages and the built labextension; rebuilt when sources change.
$(VENV)/.installed: $(BIN)/python pyproject.toml labextension/package.json $(wildcard labextension/src/*) $(wildcard labextension/style/*)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet $(GPU_PINS) hatchling hatch-jupyter-builder editables "jupyterlab>=4.4,<5"
	rm -f jupyter_mlcloud/labextension/static/style.js  # force a fresh build of the sidebar
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"
	$(BIN)/jupyter labextension develop --overwrite .
	$(BIN)/jupyter server extension enable --sys-prefix jupyter_mlcloud
	touch $@

# Debian's chromium drives the browser tests (a test tool's own browser download fails offline).
system-deps:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm; }

install: system-deps $(VENV)/.installed

lab: install
	$(BIN)/jupyter lab --notebook-dir=notebooks --ServerApp.port_retries=0 $(ROOT_FLAG)

test: install
	$(BIN)/ruff check jupyter_mlcloud tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports
	cd labextension && npm run --silent lint
	$(BIN)/python -m pytest tests --durations=25 $(PYTEST_ARGS)

demo: install
	$(BIN)/python notebooks/run.py notebooks/01-quickstart.ipynb

bench: install
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test,bench]"
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: install
	$(BIN)/ruff check jupyter_mlcloud tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) labextension/node_modules labextension/lib jupyter_mlcloud/labextension dist build
