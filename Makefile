# alignkit — set-up, quickstart and tests from a fresh clone (docs/install.md).
#   make quickstart   creates .venv, installs alignkit, runs `alignkit quickstart`
#   make test         creates .venv, installs alignkit[dev], runs the default (fast) test suite
#   make test-all     ... including the slow end-to-end tests
#   make test-lowest  the fast tests in .venv-lowest, on the lowest versions pyproject.toml allows
#   make lock         rewrite constraints.txt from what .venv has installed (after a tested upgrade)
# .venv installs the exact tested versions of constraints.txt; `make CONSTRAINTS= venv` resolves freely.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.alignkit-installed
CONSTRAINTS ?= constraints.txt
# no .pyc at install time (a module compiles when first imported: most of transformers never is)
PIP_FLAGS := --quiet --no-compile --disable-pip-version-check
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.alignkit-installed
TORCH_VERSION   ?= $(shell sed -n 's/^torch==\([^ ;]*\).*/\1/p' constraints.txt)
TORCH_LOWEST    ?= $(shell sed -n 's/^ *"torch>=\([^,"]*\).*/\1/p' pyproject.toml)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv quickstart test test-all test-lowest lock lint clean

venv: $(STAMP)

# $(call install_torch,PYTHON,VERSION). torch first: without a CUDA GPU the CPU wheel (a local wheel when
# pip's find-links has one, else PyTorch's CPU index), so that `torch` never pulls a multi-GB CUDA build.
install_torch = if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch $(2) from PyPI"; \
		$(1) -m pip install $(PIP_FLAGS) "torch==$(2)"; \
	else \
		echo "no CUDA GPU: installing the CPU build of torch $(2)"; \
		if $(1) -m pip install $(PIP_FLAGS) --no-index --no-deps "torch==$(2)" 2>/dev/null; then \
			$(1) -m pip install $(PIP_FLAGS) "torch==$(2)"; \
		else \
			$(1) -m pip install $(PIP_FLAGS) "torch==$(2)" --index-url $(TORCH_CPU_INDEX); \
		fi; \
	fi

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	@$(call install_torch,$(PY),$(TORCH_VERSION))
	$(PY) -m pip install $(PIP_FLAGS) $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

# every pin at its lower bound (.ci/constraints.py lowest: pip has no --resolution=lowest); torch at its
# floor: its CPU wheel when one can be had, else PyPI's (CUDA) build of it, which runs on a CPU too but
# downloads ~3 GB; else the tested torch (said on the console)
$(LOWEST_STAMP): pyproject.toml .ci/constraints.py
	rm -rf $(LOWEST)
	mkdir -p $(LOWEST) && echo '*' > $(LOWEST)/.gitignore
	$(PYTHON) -m venv $(LOWEST)
	$(PYTHON) .ci/constraints.py lowest --extra dev --skip torch > $(LOWEST)/constraints.txt
	@( $(call install_torch,$(LOWEST)/bin/python,$(TORCH_LOWEST)) ) || { \
		echo "no CPU wheel of torch $(TORCH_LOWEST): installing PyPI's build of it (~3 GB)"; \
		$(LOWEST)/bin/python -m pip install $(PIP_FLAGS) "torch==$(TORCH_LOWEST)"; } || { \
		echo "*** torch $(TORCH_LOWEST) (the floor) cannot be installed here: the lowest run uses torch $(TORCH_VERSION)"; \
		$(call install_torch,$(LOWEST)/bin/python,$(TORCH_VERSION)); }
	$(LOWEST)/bin/python -m pip install $(PIP_FLAGS) -c $(LOWEST)/constraints.txt -e ".[dev]"
	touch $(LOWEST_STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/alignkit quickstart --overwrite

# two workers (pytest-xdist, one math thread each: tests/conftest.py); the 15 slowest tests are listed
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15 -m ""

test-lowest: $(LOWEST_STAMP)
	@$(LOWEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets) '
	HF_HUB_OFFLINE=1 $(LOWEST)/bin/python -m pytest -q -n 2 --durations=15

lock: $(STAMP)
	$(PY) .ci/constraints.py lock > $(CONSTRAINTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check alignkit tests

clean:
	rm -rf $(VENV) $(LOWEST) runs .pytest_cache .ruff_cache
