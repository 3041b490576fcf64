# Everything a fresh clone needs: `make demo`, `make test`.
# torch is pinned: an unpinned `pip install torch` pulls several GB of CUDA packages.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fusepass-installed

.PHONY: setup demo test test-fast bench sweep clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,bench]' $(TORCH)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fusepass.demo

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
