# Everything a fresh clone needs: `make demo`, `make test`.
# torch is pinned: an unpinned `pip install torch` pulls several GB of CUDA packages.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fusepass-installed

.PHONY: setup demo test test-fast bench sweep clean ipex-env test-ipex

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,bench,int8]' $(TORCH)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m bench.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --hypothesis-profile=ci

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

sweep: $(STAMP)  # the real-model sweep with larger configs
	FUSEPASS_SWEEP=large $(BIN)/python -m pytest -q tests/test_sweep.py

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info

# Optional second env for the ipex lowering target: torch 2.8.0 (PyPI's CUDA build, run on
# CPU) + intel-extension-for-pytorch 2.8.0, ~93 s and 5.7 GB (scripts/ipex_env.sh). Not part
# of `make test`. fusepass is re-installed editable (--no-deps: nothing may pull another
# torch) whenever pyproject.toml changes its package list; the test/bench extras depend on
# no torch, and transformers is pinned to the default env's version.
IPEX_VENV  ?= .venv-ipex
IPEX_STAMP := $(IPEX_VENV)/.fusepass-installed
IPEX_EXTRAS ?= pytest hypothesis transformers==5.23.0 psutil

$(IPEX_STAMP): pyproject.toml scripts/ipex_env.sh
	scripts/ipex_env.sh $(abspath $(IPEX_VENV))
	$(IPEX_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	$(IPEX_VENV)/bin/python -m pip install -q --disable-pip-version-check $(IPEX_EXTRAS)
	touch $(IPEX_STAMP)

ipex-env: $(IPEX_STAMP)

test-ipex: $(IPEX_STAMP)
	$(IPEX_VENV)/bin/python -m pytest -q -x -p no:logging --hypothesis-profile=ci
