"""``reward=format``: 1 if the completion matches a regular expression, else 0.

The default is DeepSeek-R1's template, reasoning in ``<think>...</think>`` and then the answer in
``<answer>...</answer>`` (open-r1's ``format_reward``; TRL's ``think_format_reward`` checks the
think block only). Written by hand because it is one ``re.match``.
"""

from __future__ import annotations

import re
from typing import Any

from rlx.errors import RlxError
from rlx.rewards import REWARDS

# one think block, then one answer block, nothing around them; neither block contains another tag
R1_TEMPLATE = (
    r"^\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*$"
)


def check_format(kwargs: dict[str, Any]) -> None:
    """The pattern compiles (a bad one fails at start-up, not at the first rollout)."""
    pattern = kwargs.get("pattern", R1_TEMPLATE)
    try:
        re.compile(str(pattern))
    except re.error as exc:
        raise RlxError(f"reward.pattern={pattern!r} is not a regular expression: {exc}") from exc


@REWARDS.register("format", check=check_format, max_reward=lambda prompt: 1.0)
def format_reward(
    prompts: list[Any], completions: list[Any], *, pattern: str = R1_TEMPLATE, **columns: Any
) -> list[float]:
    """1.0 if ``re.match(pattern, completion, re.DOTALL)`` (anchor with ``^...$`` for the whole
    completion), else 0.0: the format reward of DeepSeek-R1 (Guo et al. 2025). The completion is its
    text without special tokens (``completion_text``), so an EOS token does not break ``$``."""
    regex = re.compile(pattern, re.DOTALL)
    texts = columns.get("completion_text") or completions
    return [1.0 if regex.match(str(t)) else 0.0 for t in texts]
