"""``reward=model``: the scalar score of a trained reward model for (prompt, completion).

The reward model is a sequence-classification checkpoint with ``num_labels = 1`` (what ``algo=rm``
and TRL's RewardTrainer write), loaded with `rlx.models.reward_model.load_reward_model`. Its input is
built by `encode_for_reward` from the ``prompt_text`` / ``completion_text`` columns of the rollout
(prompt template + completion + EOS) and the score is read at the last real token by
`reward_scores`: exactly what training the reward model used, so a score means the same in both.

The model is loaded once per process (cached by directory) and checked when the config is planned,
so a missing directory or a checkpoint that is not a reward model stops the run before training.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from rlx.errors import RlxError
from rlx.models.reward_model import encode_for_reward, load_reward_model, reward_scores
from rlx.rewards import REWARDS
from rlx.runtime import resolve_device


@lru_cache(maxsize=4)
def _loaded(path: str, device: str) -> tuple[Any, Any]:
    model, tokenizer = load_reward_model(path)
    model.to(resolve_device(device)).eval().requires_grad_(False)
    return model, tokenizer


def _key(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def check_reward_model(kwargs: dict[str, Any]) -> None:
    """Start-up check (run by the loop's plan): the directory exists and holds a reward model."""
    path = kwargs.get("path")
    if path in (None, "", "???"):
        raise RlxError("reward=model needs reward.path=<a reward model directory, e.g. an rm run's final/>")
    if int(kwargs.get("batch_size", 1)) < 1:
        raise RlxError(f"reward.batch_size must be >= 1, got {kwargs.get('batch_size')}")
    _loaded(_key(str(path)), str(kwargs.get("device", "auto")))


@REWARDS.register("model", check=check_reward_model)
@torch.no_grad()
def reward_model_score(
    prompts: list[Any],
    completions: list[Any],
    *,
    prompt_text: list[str],
    completion_text: list[str],
    path: str = "???",
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "auto",
) -> list[float]:
    """r_i = RM(prompt_i, completion_i): the reward model's scalar head at the last real token
    (Ziegler et al. 2019; Ouyang et al. 2022). An outcome reward; no normalisation is applied."""
    model, tokenizer = _loaded(_key(path), device)
    dev = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompt_text), batch_size):
        ids, mask = encode_for_reward(
            tokenizer,
            prompt_text[start : start + batch_size],
            completion_text[start : start + batch_size],
            max_length=max_length,
        )
        out.extend(reward_scores(model, ids.to(dev), mask.to(dev)).float().cpu().tolist())
    return out
