# Two entry points (see README): `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ALLMPNET := $(VENV)/bin/allmpnet

.PHONY: setup weights demo test clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU build lies on local disk, while an unpinned torch would pull a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

weights: setup
	$(ALLMPNET) download

demo: weights
	$(ALLMPNET) demo --corpus examples/demo_corpus.txt

test: weights
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
