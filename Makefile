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

bench: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
