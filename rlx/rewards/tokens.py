"""Seed 001's reward: +1 for every generated token equal to the target token."""

from __future__ import annotations

from typing import Any

from rlx.rewards import REWARDS


@REWARDS.register("token_match", process=True)
def token_match_reward(
    prompts: list[Any], completions: list[list[int | None]], *, target: int = 1, normalize: bool = True
) -> list[list[float]]:
    """Process reward r_t = 1 if y_t == target else 0 (seed 001's ``fake_reward``), one per token.

    ``normalize=true`` divides by the completion's length, so a completion's summed reward is the
    share of matching tokens (``reward/mean`` and ``eval/reward`` read 1.0 = perfect); false gives
    seed 001's +1 per token.
    """
    out = []
    for y in completions:
        scale = 1.0 / max(len(y), 1) if normalize else 1.0
        out.append([scale if tok == target else 0.0 for tok in y])
    return out
