"""The lecture's sorting task: the prompt is n integers from 0..V-1, the answer is them sorted.

The training stream is seeded and indexed by step: the prompts of step k are a pure function of
(seed, k), so a resumed run sees the same prompts and ranks can shard one global batch. The held-out
evaluation set is drawn once from its own seed and is disjoint from every training prompt (training
draws that land in it are rejected). With ``prompts`` given (the lecture's three fixed prompts) the
stream cycles through them and evaluation uses the same prompts: there is nothing held out then.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlx.errors import RlxError
from rlx.tasks import MAX_LENGTH, MAX_VOCAB, NumberText, PromptBatch

_EVAL_STREAM = 0x5EED_E7A1  # separates the evaluation draw from every training step's draw


class SortTask(NumberText):
    """Sort ``length`` integers drawn uniformly (with repeats) from ``0..vocab-1``."""

    name = "sort"

    def __init__(
        self,
        length: int = 4,
        vocab: int = 10,
        eval_size: int = 500,
        seed: int = 1234,
        prompts: list[list[int]] | None = None,
    ) -> None:
        if prompts is not None:
            if not all(isinstance(p, list) and all(isinstance(x, int) for x in p) for p in prompts):
                raise RlxError(f"task.prompts must be a list of integer lists, got {prompts!r:.200}")
            prompts = [list(map(int, p)) for p in prompts]
            if not prompts or any(len(p) != len(prompts[0]) for p in prompts):
                raise RlxError("task.prompts must be a non-empty list of equal-length integer lists")
            length = len(prompts[0])
            vocab = max(vocab, max(max(p) for p in prompts) + 1)
        if length < 1:
            raise RlxError(f"task.length must be at least 1, got {length}")
        if vocab < 2:
            raise RlxError(f"task.vocab must be at least 2, got {vocab}")
        if length > MAX_LENGTH or vocab > MAX_VOCAB:
            raise RlxError(f"task.length={length}, task.vocab={vocab}: at most {MAX_LENGTH} and {MAX_VOCAB}")
        if seed < 0:
            raise RlxError(f"task.seed must be >= 0, got {seed}")
        if prompts is not None and any(min(p) < 0 for p in prompts):
            raise RlxError("task.prompts must hold integers >= 0")
        self.length = int(length)
        self.vocab = int(vocab)
        self.seed = int(seed)
        self.fixed = prompts
        self.max_new_tokens = self.length
        if prompts is None:
            space = self.vocab**self.length
            if eval_size < 1 or 2 * eval_size > space:
                raise RlxError(
                    f"task.eval_size={eval_size} must be between 1 and half of the {space} possible "
                    f"prompts (vocab={self.vocab}, length={self.length})"
                )
            self._eval = self._draw_distinct(np.random.default_rng([self.seed, _EVAL_STREAM]), eval_size)
        else:
            self._eval = prompts
        self._eval_keys = {tuple(p) for p in self._eval}

    # -- prompt streams ------------------------------------------------------------------------
    def _draw_distinct(self, rng: np.random.Generator, n: int) -> list[list[int]]:
        seen: set[tuple[int, ...]] = set()
        out: list[list[int]] = []
        while len(out) < n:
            p = tuple(int(x) for x in rng.integers(0, self.vocab, size=self.length))
            if p not in seen:
                seen.add(p)
                out.append(list(p))
        return out

    def _batch(self, prompts: list[list[int]]) -> PromptBatch:
        return PromptBatch(prompts, {"ground_truth": [sorted(p) for p in prompts]})

    def train_batch(
        self, step: int, size: int, rank: int = 0, world_size: int = 1, stream: int = 0
    ) -> PromptBatch:
        """The prompts of training step ``step`` for this rank (a slice of one global batch).

        ``stream`` > 0 draws an independent batch for the same step (DAPO's extra sampling rounds).
        """
        total = size * world_size
        if self.fixed is not None:
            start = (step + stream) * total
            prompts = [self.fixed[(start + i) % len(self.fixed)] for i in range(total)]
        else:
            rng = np.random.default_rng([self.seed, 1, step] if stream == 0 else [self.seed, 2, step, stream])
            prompts = []
            while len(prompts) < total:
                p = [int(x) for x in rng.integers(0, self.vocab, size=self.length)]
                if tuple(p) not in self._eval_keys:
                    prompts.append(p)
        return self._batch(prompts[rank * size : (rank + 1) * size])

    def eval_batch(self) -> PromptBatch:
        return self._batch([list(p) for p in self._eval])

    # -- correctness ---------------------------------------------------------------------------
    def is_correct(self, prompt: list[int], completion: list[Any], **_: Any) -> bool:
        return list(completion) == sorted(prompt)
