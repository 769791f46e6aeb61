"""A prompt task read from a dataset file: instruction data (Dolly, TRL prompt files) for the online loop.

``task=text task.path=dolly.jsonl`` gives `rlx train` (GRPO, RLOO, ... with ``reward=model`` or a
custom reward) prompts from any file `rlx.data` reads: a ``prompt`` column, or Dolly's
``instruction``/``context`` (with Dolly's prompt template). A ``completion`` / ``response`` column, when
present, reaches rewards as the ``reference`` column. Held-out prompts are ``task.eval_path`` or, when
it is not set, ``eval_size`` prompts set aside from the file (never drawn for training).
There is no ground truth, so ``eval/exact`` is 0; ``eval/reward`` is the held-out reward.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlx.data import read_examples
from rlx.errors import RlxError
from rlx.tasks import PromptBatch


class TextPromptTask:
    """Prompts (text) from a dataset; completions are text."""

    name = "text"
    has_ground_truth = False

    def __init__(
        self,
        path: str = "???",
        eval_path: str | None = None,
        format: str = "auto",
        columns: dict[str, Any] | None = None,
        split: str = "train",
        eval_size: int = 64,
        max_new_tokens: int = 128,
        seed: int = 1234,
    ) -> None:
        if path in ("???", "", None):
            raise RlxError("task=text needs task.path=<prompt file or hub dataset>")
        if max_new_tokens < 1:
            raise RlxError(f"task.max_new_tokens must be >= 1, got {max_new_tokens}")
        if seed < 0:
            raise RlxError(f"task.seed must be >= 0, got {seed}")
        if eval_path is None and eval_size < 1:  # checked again against the file's size below
            raise RlxError(f"task.eval_size must be >= 1, got {eval_size}")
        rows, _ = read_examples(path, "prompts", fmt=format, columns=columns, split=split, where="task.path")
        prompts = [r.prompt for r in rows]
        refs = [r.completion for r in rows]
        order = np.random.default_rng(seed).permutation(len(prompts)).tolist()
        if eval_path:
            ev, _ = read_examples(eval_path, "prompts", fmt=format, columns=columns, where="task.eval_path")
            self._eval = ([r.prompt for r in ev], [r.completion for r in ev])
            train_idx = order
        else:
            if not 1 <= eval_size < len(prompts):
                raise RlxError(f"task.eval_size={eval_size} must be in [1, {len(prompts) - 1}] for {path}")
            held, train_idx = order[:eval_size], order[eval_size:]
            self._eval = ([prompts[i] for i in held], [refs[i] for i in held])
        self._train = ([prompts[i] for i in train_idx], [refs[i] for i in train_idx])
        self.seed = int(seed)
        self.max_new_tokens = int(max_new_tokens)

    def _batch(self, prompts: list[str], refs: list[str]) -> PromptBatch:
        return PromptBatch(list(prompts), {"reference": list(refs)})

    def train_batch(
        self, step: int, size: int, rank: int = 0, world_size: int = 1, stream: int = 0
    ) -> PromptBatch:
        """Prompts of step ``step``: a pure function of (seed, step, stream), sliced for this rank."""
        rng = np.random.default_rng([self.seed, 1, step, stream])
        idx = rng.integers(0, len(self._train[0]), size=size * world_size).tolist()
        idx = idx[rank * size : (rank + 1) * size]
        return self._batch([self._train[0][i] for i in idx], [self._train[1][i] for i in idx])

    def eval_batch(self) -> PromptBatch:
        return self._batch(*self._eval)

    def prompt_text(self, prompt: str) -> str:
        return prompt

    def parse_completion(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def is_correct(self, prompt: str, completion: Any, **_: Any) -> bool:
        return False
