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

.PHONY: install run test test-fast lint format quality bench rlhf-sort clean screenshots test-browser

install: $(STAMP)

# torch goes in first, pinned, so that resolving the other dependencies never replaces it with a
# CUDA build; `pip install -e .` then finds torch satisfied and installs nothing more for it.
# pip byte-compiles what it installs one file after another (about 60 s here); compileall writes the
# same .pyc files on every core instead (about 30 s on 2). Like pip, it skips a file that does not
# compile (compileall then exits 1, hence `|| true`).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet --no-compile "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet --no-compile -e ".[dev,lora]" "$(TORCH_SPEC)"
	$(BIN)/python -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	touch $(STAMP)

run: install
	$(BIN)/rlx train algo=grpo reward=sort $(ARGS)

# Two pytest workers (pytest-xdist), one thread per process: on a 2-core machine the subprocess-heavy
# tests overlap instead of waiting on each other. Tests go to whichever worker is free, one at a time
# (`loadgroup`), except the files tests/conftest.py keeps together (an expensive module fixture).
PYTEST_WORKERS ?= 2

test: install
	$(BIN)/ruff check rlx tests scripts
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=25 $(ARGS)

# The edit-test loop: the math, the registries, the settings, the import structure and the update
# stages on hand-built batches (no training runs, no subprocesses but one).
FAST_TESTS := tests/test_advantages.py tests/test_kl.py tests/test_losses.py tests/test_ppo_math.py \
	tests/test_preference_losses.py tests/test_properties.py tests/test_registry.py tests/test_rewards.py \
	tests/test_settings.py tests/test_imports.py tests/test_update.py tests/test_offline_step.py \
	tests/test_sort_task.py

test-fast: install
	$(BIN)/ruff check rlx tests scripts
	$(BIN)/python -m pytest -q $(FAST_TESTS) $(ARGS)

lint: install
	$(BIN)/ruff check rlx tests scripts
	$(BIN)/ruff format --check rlx tests scripts

format: install
	$(BIN)/ruff format rlx tests scripts
	$(BIN)/ruff check --fix rlx tests scripts

# Learning-quality figures quoted in the README (minutes each; not part of `make test`).
quality: install
	$(BIN)/python scripts/learning_quality.py $(ARGS)

# rlx against TRL's GRPOTrainer on identical work (the toy and real-vocabulary rows; minutes to an hour on
# a CPU): installs the `bench` extra (TRL), then writes outputs/bench/results.json and results.md.
#   make bench ARGS="--rows toy --reps 5"
bench: install
	$(PIP) install --quiet -e ".[bench]" "$(TORCH_SPEC)"
	$(BIN)/python scripts/bench.py $(ARGS)

# The RLHF pipeline on the sort task (experiment=rlhf_sort): data -> SFT -> reward model -> RL on the
# reward model with KL to the SFT model -> rlx eval; and DPO from the same SFT model on the same pairs.
# Each stage reads the previous stages' directories under RLHF_DIR. RLHF_RL picks the RL stage, e.g.
#   make rlhf-sort RLHF_RL="algo=grpo reward=model reward.path=outputs/rlhf_sort/rm/final" RLHF_RL_DIR=grpo
RLHF_DIR    ?= outputs/rlhf_sort
RLHF_RL     ?= algo=ppo reward=model reward.path=$(RLHF_DIR)/rm/final
RLHF_RL_DIR ?= ppo
RLHF_ARGS   ?=
RLHF := $(BIN)/rlx train experiment=rlhf_sort rlhf.dir=$(RLHF_DIR) $(RLHF_ARGS)

rlhf-sort: install
	$(BIN)/rlx data sort --out $(RLHF_DIR)/data
	$(RLHF) algo=sft
	$(BIN)/rlx data sort --out $(RLHF_DIR)/data --policy $(RLHF_DIR)/sft/final
	$(RLHF) algo=rm
	$(RLHF) $(RLHF_RL)
	$(RLHF) algo=dpo
	$(BIN)/rlx eval $(RLHF_DIR)/sft
	$(BIN)/rlx eval $(RLHF_DIR)/$(RLHF_RL_DIR)
	$(BIN)/rlx eval $(RLHF_DIR)/dpo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# docs/mlflow_*.png: real runs into a real `mlflow server`, photographed by headless chromium
# (Debian: apt-get install chromium; the script's driver: pip install 'rlx[screenshots]'). Minutes.
# The MLflow UI in a real browser (tests marked `browser`; not in `make test`: CI has no browser).
test-browser: install
	$(BIN)/python -m pip install --quiet -e ".[screenshots]"
	$(BIN)/python -m pytest -q -m browser tests/test_mlflow_ui.py $(ARGS)

screenshots: install
	$(BIN)/python -m pip install --quiet -e ".[screenshots]"
	OMP_NUM_THREADS=1 $(BIN)/python scripts/screenshots.py --out docs $(ARGS)
