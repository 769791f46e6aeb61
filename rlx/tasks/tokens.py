"""Seed 001's "baby RLHF" task: a start token as the prompt, ``length`` tokens to generate.

There is no answer to get right, only a reward on the generated tokens (``reward=token_match``). The
training prompts are the start token repeated; the held-out "set" is that same single prompt,
decoded greedily: with one prompt nothing can be held out, so evaluation measures the policy's mode.
"""

from __future__ import annotations

from typing import Any

from rlx.errors import RlxError
from rlx.tasks import MAX_LENGTH, MAX_VOCAB, NumberText, PromptBatch


class TokensTask(NumberText):
    """Prompt ``[start]``; completions are ``length`` tokens from ``0..vocab-1``."""

    name = "tokens"

    def __init__(self, vocab: int = 10, length: int = 8, start: int = 0, target: int = 1) -> None:
        if vocab < 2:
            raise RlxError(f"task.vocab must be at least 2, got {vocab}")
        if length < 1:
            raise RlxError(f"task.length must be at least 1, got {length}")
        if length > MAX_LENGTH or vocab > MAX_VOCAB:
            raise RlxError(f"task.length={length}, task.vocab={vocab}: at most {MAX_LENGTH} and {MAX_VOCAB}")
        for key, value in (("start", start), ("target", target)):
            if not 0 <= value < vocab:
                raise RlxError(f"task.{key}={value} must be a token in 0..{vocab - 1}")
        self.vocab = int(vocab)
        self.length = 1  # prompt length (what the model builders size positions by)
        self.max_new_tokens = int(length)
        self.start = int(start)
        self.target = int(target)

    def _batch(self, n: int) -> PromptBatch:
        return PromptBatch([[self.start] for _ in range(n)])

    def train_batch(
        self, step: int, size: int, rank: int = 0, world_size: int = 1, stream: int = 0
    ) -> PromptBatch:
        return self._batch(size)

    def eval_batch(self) -> PromptBatch:
        return self._batch(1)

    def is_correct(self, prompt: list[int], completion: list[Any], **columns: Any) -> bool:
        """Every generated token is ``task.target`` (keep it equal to ``reward.target``)."""
        return len(completion) == self.max_new_tokens and all(t == self.target for t in completion)
