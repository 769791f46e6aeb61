"""The rewards of scripts/bench.py: both frameworks call these very functions (rlx through
``reward=custom reward.fn=bench_rewards:...``, TRL as ``reward_funcs``). Kept in a folder of their own
so that putting it on PYTHONPATH exposes nothing else (scripts/ holds a ``numbers.py``)."""

from __future__ import annotations


def length_reward(prompts, completions, **_):
    """real_vocab rows: a cheap format reward, the completion's word count over 64 (capped at 1)."""
    return [min(len(str(c).split()) / 64.0, 1.0) for c in completions]


def sort_reward_text(prompts, completions, ground_truth, **_):
    """toy row under TRL: rlx's sort reward (positions equal to sorted(prompt)) on decoded text."""
    from rlx.rewards.sort import sort_distance_reward

    parsed = [[int(w) if w.isdigit() else None for w in str(c).split()] for c in completions]
    return sort_distance_reward(prompts, parsed, ground_truth=ground_truth)
