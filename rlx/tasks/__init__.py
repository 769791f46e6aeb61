"""Tasks: prompt sources with their ground truth, and how their prompts/completions meet a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class PromptBatch:
    """Prompts (task-level objects) and the per-prompt columns a reward may ask for by name."""

    prompts: list[Any]
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def repeat(self, group_size: int) -> PromptBatch:
        """Each prompt (and its columns) ``group_size`` times in a row: the prompt-major group layout."""
        rep = [p for p in self.prompts for _ in range(group_size)]
        cols = {k: [v for v in vals for _ in range(group_size)] for k, vals in self.columns.items()}
        return PromptBatch(rep, cols)

    def select(self, indices: list[int]) -> PromptBatch:
        return PromptBatch(
            [self.prompts[i] for i in indices],
            {k: [v[i] for i in indices] for k, v in self.columns.items()},
        )

    @staticmethod
    def concat(batches: list[PromptBatch]) -> PromptBatch:
        out = PromptBatch([], {k: [] for k in batches[0].columns} if batches else {})
        for b in batches:
            out.prompts.extend(b.prompts)
            for k, v in b.columns.items():
                out.columns[k].extend(v)
        return out


class Task(Protocol):
    """What the online loop needs from a task."""

    name: str
    max_new_tokens: int

    def train_batch(
        self, step: int, size: int, rank: int = 0, world_size: int = 1, stream: int = 0
    ) -> PromptBatch: ...

    def eval_batch(self) -> PromptBatch: ...

    def prompt_text(self, prompt: Any) -> str: ...

    def parse_completion(self, tokens: list[str]) -> Any: ...

    def is_correct(self, prompt: Any, completion: Any, **columns: Any) -> bool: ...


# Bounds of the integer tasks: one token per number (a larger vocabulary is an embedding table that
# exhausts memory), and a prompt or answer longer than any model rlx builds for them has positions.
MAX_VOCAB = 100_000
MAX_LENGTH = 4096


class NumberText:
    """Text codec of the number tasks (sort, tokens): prompts are space-separated numbers 0..vocab-1,
    completion tokens spell one number each."""

    vocab: int

    def prompt_text(self, prompt: list[int]) -> str:
        return " ".join(str(x) for x in prompt)

    def parse_completion(self, tokens: list[str]) -> list[int | None]:
        """One entry per completion token: the integer it spells, or None (EOS, specials, junk)."""
        out: list[int | None] = []
        for tok in tokens:
            t = tok.strip()
            out.append(int(t) if t.isdigit() and int(t) < self.vocab else None)
        return out
