# Two entry points: `make demo` (install, then generate with the embedded Gemma 3 270M) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PROMPT ?= The capital of France is

.PHONY: install demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	# the CPU build of torch, pinned here only (the library itself accepts a range)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'

demo: install
	$(VENV)/bin/gemmakit generate default "$(PROMPT)" --max-new-tokens 32

test: install
	$(VENV)/bin/ruff check gemmakit tests bench
	$(PY) -m pytest -q

# The peers are benchmark-only dependencies: llama-cpp-python compiles llama.cpp from source (several minutes,
# once), with GGML_NATIVE so that it uses this CPU's AVX512 like gemmakit does.
bench: install
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" $(PIP) install -q llama-cpp-python
	$(PIP) install -q transformers
	$(PY) bench/compare.py --threads 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
