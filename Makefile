# rlx: set-up and everyday commands. Every target creates the virtual environment when it is missing.
#
# TORCH_SPEC picks the torch build. The default resolves to the CPU wheel on a CPU-only machine; on a
# GPU machine pass the build you want, e.g.
#   make run TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
ARGS        ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.rlx-installed

.PHONY: install run test lint format quality clean

install: $(STAMP)

# torch goes in first, pinned, so that resolving the other dependencies never replaces it with a
# CUDA build; `pip install -e .` then finds torch satisfied and installs nothing more for it.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

run: install
	$(BIN)/rlx train algo=grpo reward=sort $(ARGS)

test: install
	$(BIN)/ruff check rlx tests scripts
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check rlx tests scripts
	$(BIN)/ruff format --check rlx tests scripts

format: install
	$(BIN)/ruff format rlx tests scripts
	$(BIN)/ruff check --fix rlx tests scripts

# Learning-quality figures quoted in the README (minutes each; not part of `make test`).
quality: install
	$(BIN)/python scripts/learning_quality.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
