"""Shared helpers: compose rlx's real configs, tiny overrides that keep runs to seconds on a CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process (this one and the rlx it starts)

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

torch.set_num_threads(1)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
RLX = shutil.which("rlx", path=str(Path(sys.executable).parent)) or "rlx"

# A tiny but real configuration: a 1-layer GPT-2, 4 prompts x 4 completions, 2 iterations.
TINY_GPT = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]
TINY_RUN = [
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "trainer.steps=2",
    "trainer.eval_every=0",
    "trainer.samples_every=1",
    "task.eval_size=16",
]
TINY = [*TINY_GPT, *TINY_RUN]


def compose_cfg(overrides: list[str] | tuple[str, ...] = ()):
    """rlx's composed training config with ``overrides``, exactly as `rlx train` builds it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="rlx.conf", version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded MLflow store for the session (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow-store")


def run_rlx(*args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None):
    """The installed console script, run as a user would, from ``cwd``."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [RLX, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


# Files whose module-scoped fixture is itself a long job (torchrun's 2-rank updates, an mlflow server with
# a sweep): their tests stay on one pytest-xdist worker (`--dist loadgroup`), so the fixture runs once.
# Every other test is handed to whichever worker is free, one test at a time.
ONE_WORKER_FILES = ("test_distributed.py", "test_mlflow_ui.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in ONE_WORKER_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
