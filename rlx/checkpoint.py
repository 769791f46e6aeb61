"""Checkpoints: a ``save_pretrained`` directory plus the trainer's state.

``checkpoints/step_000120/`` holds the model (safetensors + config + tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``), ``rlx_config.yaml`` (the
run's composed config, so a checkpoint is self-describing) and ``trainer_state.pt`` (optimizer,
scheduler, step, RNG states). A checkpoint is written to a temporary sibling directory and renamed into
place, so an interruption never leaves a half-written ``step_*`` directory; the newest ``keep`` are kept.
Trainer state is read with ``torch.load(weights_only=True)``: nothing in a checkpoint is executed.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlx.models import Policy

TRAINER_STATE = "trainer_state.pt"
CONFIG_NAME = "rlx_config.yaml"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(path: Path, policy: Policy, config_yaml: str) -> None:
    """A ``save_pretrained`` directory with the run's config beside the weights."""
    path.mkdir(parents=True, exist_ok=True)
    policy.save(path)
    (path / CONFIG_NAME).write_text(config_yaml, encoding="utf-8")


def save_checkpoint(
    root: Path,
    step: int,
    policy: Policy,
    *,
    config_yaml: str,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/step_{step:06d}`` atomically and prune all but the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(tmp, policy, config_yaml)
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)
    if final.exists():  # re-saving a step: swap, then drop the old copy
        old = root / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep > 0:
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file())


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
