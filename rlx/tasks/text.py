"""A prompt task read from a dataset file: instruction data, math problems, chat prompts.

``task=text task.path=data.jsonl`` gives `rlx train` (GRPO, RLOO, ... with ``reward=math``,
``reward=model`` or a custom reward) prompts from any file `rlx.data` reads: a ``prompt`` column
(text, or a list of chat messages as in TRL's conversational format), a ``messages`` column, or
Dolly's ``instruction``/``context`` (with Dolly's prompt template).

Every column of a row reaches the reward as a keyword argument, one value per completion, as in
TRL's GRPOTrainer: a GSM8K file's ``answer`` column arrives as ``answer=[...]``. A ``completion`` /
``response`` column also arrives as ``reference``. ``task.columns.prompt=question`` maps the prompt.

``task.system_prompt`` turns every prompt into a chat (system turn + user turn), rendered by the
tokenizer's chat template. ``task.ground_truth`` names the column with the reference answer (by
default the column ``reward=math`` verifies against): then ``eval/exact`` is the share of held-out
prompts whose greedy answer math-verify accepts, and offline runs (SFT) log it too.

Held-out prompts are ``task.eval_path`` or, when it is not set, ``eval_size`` prompts set aside from
the file (never drawn for training).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlx.data import Example, as_messages, read_examples
from rlx.errors import RlxError
from rlx.tasks import PromptBatch

# Not passed by name, as in TRL: the prompt and completion columns (rewards get the prompts and their
# own completions positionally; a reference completion arrives as ``reference``) and names that
# would collide with a reward's positional arguments.
_RESERVED = ("prompt", "completion", "prompts", "completions")


class TextPromptTask:
    """Prompts (text or chat messages) from a dataset; completions are text."""

    name = "text"

    def __init__(
        self,
        path: str = "???",
        eval_path: str | None = None,
        format: str = "auto",
        columns: dict[str, Any] | None = None,
        split: str = "train",
        eval_split: str | None = None,
        subset: str | None = None,
        eval_size: int = 64,
        max_new_tokens: int = 128,
        seed: int = 1234,
        system_prompt: str | None = None,
        ground_truth: str | None = None,
    ) -> None:
        if path in ("???", "", None):
            raise RlxError("task=text needs task.path=<prompt file or hub dataset>")
        if max_new_tokens < 1:
            raise RlxError(f"task.max_new_tokens must be >= 1, got {max_new_tokens}")
        if seed < 0:
            raise RlxError(f"task.seed must be >= 0, got {seed}")
        if eval_path is None and eval_size < 1:  # checked again against the file's size below
            raise RlxError(f"task.eval_size must be >= 1, got {eval_size}")
        self.system_prompt = system_prompt or None
        read = {"fmt": format, "columns": columns, "keep_columns": True, "subset": subset}
        rows, _ = read_examples(path, "prompts", split=split, where="task.path", **read)
        order = np.random.default_rng(seed).permutation(len(rows)).tolist()
        if eval_path:
            where = "task.eval_path"
            ev, _ = read_examples(eval_path, "prompts", split=eval_split or split, where=where, **read)
            self._eval_rows = ev
            train_idx = order
        else:
            if not 1 <= eval_size < len(rows):
                raise RlxError(f"task.eval_size={eval_size} must be in [1, {len(rows) - 1}] for {path}")
            held, train_idx = order[:eval_size], order[eval_size:]
            self._eval_rows = [rows[i] for i in held]
        self._train_rows = [rows[i] for i in train_idx]
        self._columns = sorted(
            set(self._train_rows[0].columns) & set(self._eval_rows[0].columns) - set(_RESERVED)
        )
        self.ground_truth = ground_truth or None
        if self.ground_truth is not None and self.ground_truth not in self._columns:
            raise RlxError(
                f"task.ground_truth={self.ground_truth!r} (by default reward=math's reward.column): {path} "
                f"has no such column (columns: {', '.join(self._columns)}); set reward.column=<the column "
                "with the reference answer> (or task.ground_truth=...)"
            )
        self.seed = int(seed)
        self.max_new_tokens = int(max_new_tokens)
        self.chat = self.system_prompt is not None or any(
            not isinstance(r.prompt, str) for r in (*self._train_rows[:1], *self._eval_rows[:1])
        )

    @property
    def has_ground_truth(self) -> bool:
        """True when a column holds reference answers (``task.ground_truth``): ``eval/exact`` is real."""
        return self.ground_truth is not None

    def column_names(self) -> list[str]:
        """The columns every reward receives as keyword arguments (besides ``reference``,
        ``prompt_text`` and ``completion_text``)."""
        return ["reference", *self._columns]

    def _prompt(self, row: Example) -> Any:
        prompt = row.prompt
        if self.system_prompt is None:
            return prompt
        messages = as_messages(prompt) or [{"role": "user", "content": str(prompt)}]
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def _batch(self, rows: list[Example]) -> PromptBatch:
        columns: dict[str, list[Any]] = {"reference": [r.completion for r in rows]}
        for name in self._columns:
            columns[name] = [r.columns.get(name) for r in rows]
        return PromptBatch([self._prompt(r) for r in rows], columns)

    def train_batch(
        self, step: int, size: int, rank: int = 0, world_size: int = 1, stream: int = 0
    ) -> PromptBatch:
        """Prompts of step ``step``: a pure function of (seed, step, stream), sliced for this rank."""
        rng = np.random.default_rng([self.seed, 1, step, stream])
        idx = rng.integers(0, len(self._train_rows), size=size * world_size).tolist()
        idx = idx[rank * size : (rank + 1) * size]
        return self._batch([self._train_rows[i] for i in idx])

    def eval_batch(self) -> PromptBatch:
        return self._batch(self._eval_rows)

    def prompt_text(self, prompt: Any) -> Any:
        """The prompt as the policy reads it: text, or a list of chat messages (the policy renders
        those with its tokenizer's chat template)."""
        return prompt

    def parse_completion(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def is_correct(self, prompt: Any, completion: Any, **columns: Any) -> bool:
        """With ``task.ground_truth``: math-verify accepts the completion's final answer."""
        if self.ground_truth is None:
            return False
        from rlx.rewards.math import answer_is_correct

        text = columns.get("completion_text", completion)
        return answer_is_correct(str(text), columns[self.ground_truth])
