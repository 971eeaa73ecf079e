# Two entry points (see README): `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ALLMPNET := $(VENV)/bin/allmpnet

.PHONY: setup weights demo test peers clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU build lies on local disk, while an unpinned torch would pull a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# sentence-transformers' ONNX backend and fastembed, which load our ONNX export in the tests: their own venv, as
# their pins (transformers < 4.58, huggingface-hub < 2) cannot install beside the main one's
PEERS_ONNX := .venv-peers-onnx
peers: $(PEERS_ONNX)/.installed

$(PEERS_ONNX)/.installed: benchmarks/peers/onnx.txt
	$(PYTHON) -m venv $(PEERS_ONNX)
	$(PEERS_ONNX)/bin/python -m pip install -q torch==2.13.0
	$(PEERS_ONNX)/bin/python -m pip install -q -r benchmarks/peers/onnx.txt
	touch $@

weights: setup
	$(ALLMPNET) download

demo: weights
	$(ALLMPNET) demo --corpus examples/demo_corpus.txt

test: weights peers
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(PEERS_ONNX)
