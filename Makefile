# alignkit — set-up, quickstart and tests from a fresh clone.
#   make quickstart   creates .venv, installs alignkit, runs `alignkit quickstart`
#   make test         creates .venv, installs alignkit[dev], runs the default (fast) test suite
#   make test-all     ... including the slow end-to-end tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP  := $(VENV)/.alignkit-installed

.PHONY: venv quickstart test test-all lint clean

venv: $(STAMP)

# torch first: without a CUDA GPU pin the CPU wheel (a local wheel when pip's find-links has one,
# else PyTorch's CPU index), so that the unpinned `torch` requirement never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch from PyPI"; \
		$(PIP) install --quiet "torch>=2.4"; \
	else \
		echo "no CUDA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		if $(PIP) install --quiet --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
			$(PIP) install --quiet "torch==$(TORCH_VERSION)"; \
		else \
			$(PIP) install --quiet "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
		fi; \
	fi
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/alignkit quickstart --overwrite

# two workers (pytest-xdist, one math thread each: tests/conftest.py); the 15 slowest tests are listed
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15 -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check alignkit tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
