"""Rewards for the sort task (the lecture's two partial-credit rewards, exact match, per-token).

``completions`` hold one entry per completion token: the integer it spells or None (EOS or another
non-number token), so a shorter or malformed answer simply earns less.
"""

from __future__ import annotations

from itertools import pairwise

from rlx.rewards import REWARDS


@REWARDS.register("sort", max_reward=lambda prompt: len(prompt))
def sort_distance_reward(
    prompts: list[list[int]],
    completions: list[list[int | None]],
    *,
    ground_truth: list[list[int]],
    normalize: bool = False,
) -> list[float]:
    """Number of positions where the response equals sorted(prompt) (the lecture's
    ``sort_distance_reward``); ``normalize=true`` divides by n to land in [0, 1]."""
    out = []
    for gt, y in zip(ground_truth, completions):
        hits = sum(1 for a, b in zip(y, gt) if a == b)
        out.append(hits / len(gt) if normalize else float(hits))
    return out


@REWARDS.register("sort_inclusion", max_reward=lambda prompt: 2 * len(prompt) - 1)
def sort_inclusion_ordering_reward(
    prompts: list[list[int]], completions: list[list[int | None]]
) -> list[float]:
    """One point per prompt token that appears in the response, plus one per adjacent pair with
    y_t <= y_{t+1}; at most 2n - 1 (the lecture's ``sort_inclusion_ordering_reward``).

    Kept as the lecture defined it, loophole included: inclusion asks only whether each prompt token
    appears somewhere in the response, so with repeated values a response that is not a permutation of
    the prompt can earn the maximum: for the prompt [1, 1, 2], [1, 2, 2] scores 5 of 5.
    """
    out = []
    for x, y in zip(prompts, completions):
        present = {t for t in y if t is not None}
        inclusion = sum(1 for t in x if t in present)
        ordering = sum(1 for a, b in pairwise(y) if a is not None and b is not None and a <= b)
        out.append(float(inclusion + ordering))
    return out


@REWARDS.register("sort_exact", max_reward=lambda prompt: 1)
def sort_exact_reward(
    prompts: list[list[int]], completions: list[list[int | None]], *, ground_truth: list[list[int]]
) -> list[float]:
    """1 if the response is exactly sorted(prompt), else 0 (sparse)."""
    return [1.0 if list(y) == gt else 0.0 for gt, y in zip(ground_truth, completions)]


@REWARDS.register("sort_tokens", process=True, max_reward=lambda prompt: len(prompt))
def sort_token_reward(
    prompts: list[list[int]], completions: list[list[int | None]], *, ground_truth: list[list[int]]
) -> list[list[float]]:
    """Process reward r_t = 1 if y_t == sorted(prompt)_t else 0, one per completion token (tokens past
    the answer's length earn 0)."""
    return [
        [1.0 if t < len(gt) and tok == gt[t] else 0.0 for t, tok in enumerate(y)]
        for gt, y in zip(ground_truth, completions)
    ]
