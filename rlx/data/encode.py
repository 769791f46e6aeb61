"""Rows as token ids for the offline loop: tokenise, truncate (counted, never dropped), pad, pack.

`encode_rows` turns `Example` rows into unpadded prompt and completion ids the way the policy reads
them. Three limits apply, in this order:

1. ``algo.max_prompt_len``: a prompt keeps its last tokens (the end is what the answer follows);
2. ``algo.max_completion_len``: a completion keeps its first tokens (EOS included when it fits);
3. the model's context (``n_positions`` / ``max_position_embeddings``): a row whose prompt plus
   (longest) completion is still longer is cut to fit, completion first; the prompt gives up tokens
   only beyond half the context (`fit_to_context`).

Every cut prompt and every cut completion (chosen and rejected each) is counted once in
``data/truncated_prompts`` / ``data/truncated_completions``, whichever limit cut it: a long row is
trained on in part, never dropped, and never indexes past the model's position embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from rlx.data import Example


class Tokenizes(Protocol):
    """What encoding needs of a policy (`rlx.models.Policy` has it)."""

    @property
    def eos_id(self) -> int | None: ...

    def prompt_token_ids(self, texts: list[str]) -> list[list[int]]: ...

    def completion_token_ids(self, texts: list[str]) -> list[list[int]]: ...


@dataclass
class Encoded:
    """Tokenised rows: prompt ids and one (SFT) or two (pairs) completions per row, unpadded."""

    prompts: list[list[int]]
    first: list[list[int]]  # the completion (SFT) or the chosen answer
    second: list[list[int]] = field(default_factory=list)  # the rejected answer
    scores: Tensor | None = None  # [N, 2] score_chosen, score_rejected
    texts: list[Example] = field(default_factory=list)  # the rows (the reward model re-encodes text)
    counts: dict[str, float] = field(default_factory=dict)
    cut_to_context: int = 0  # rows cut to fit the model's context (also in counts' truncated_*)

    def __len__(self) -> int:
        return len(self.prompts)


def fit_to_context(
    prompt: list[int], completions: list[list[int]], context: int
) -> tuple[list[int], list[list[int]]]:
    """``prompt`` and its ``completions`` cut so that prompt + each completion fits in ``context``.

    The completion gives way first: the prompt keeps at least ``min(len(prompt), context // 2)``
    tokens (its last ones) and the completions the room left (their first tokens). Rows that fit are
    returned unchanged.
    """
    longest = max((len(c) for c in completions), default=0)
    if len(prompt) + longest <= context:
        return prompt, completions
    keep = max(context - longest, min(len(prompt), context // 2))
    if keep < len(prompt):
        prompt = prompt[len(prompt) - keep :]
    room = context - len(prompt)
    return prompt, [c[:room] for c in completions]


def encode_rows(
    policy: Tokenizes,
    rows: list[Example],
    kind: str,
    *,
    max_prompt_len: int,
    max_completion_len: int,
    append_eos: bool,
    context: int | None = None,
) -> Encoded:
    """Tokenise prompts and completions (``kind`` ``sft``: one completion, else chosen and rejected)
    as the policy reads them; truncate and count (module docstring). ``context`` None: no limit."""
    prompts = policy.prompt_token_ids([r.prompt for r in rows])
    eos = [policy.eos_id] if append_eos and policy.eos_id is not None else []
    counts = {"data/rows": float(len(rows)), "data/truncated_prompts": 0.0, "data/truncated_completions": 0.0}
    cut_p = [len(p) > max_prompt_len for p in prompts]
    prompts = [p[-max_prompt_len:] if c else p for p, c in zip(prompts, cut_p)]

    def cut_completions(texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        out, cut = [], []
        for ids in policy.completion_token_ids(texts):
            ids = ids + eos
            cut.append(len(ids) > max_completion_len)
            out.append(ids[:max_completion_len])
        return out, cut

    if kind == "sft":
        first, cut_a = cut_completions([r.completion for r in rows])
        answers, cut_c = [[c] for c in first], [[a] for a in cut_a]
    else:
        first, cut_a = cut_completions([r.chosen for r in rows])
        second, cut_b = cut_completions([r.rejected for r in rows])
        answers = [[a, b] for a, b in zip(first, second)]
        cut_c = [[a, b] for a, b in zip(cut_a, cut_b)]
    cut_to_context = 0
    if context is not None:
        for i, (prompt, comps) in enumerate(zip(prompts, answers)):
            fitted, fitted_comps = fit_to_context(prompt, comps, context)
            if fitted is prompt and fitted_comps is comps:
                continue
            cut_to_context += 1
            cut_p[i] = cut_p[i] or len(fitted) < len(prompt)
            cut_c[i] = [was or len(a) < len(b) for was, a, b in zip(cut_c[i], fitted_comps, comps)]
            prompts[i], answers[i] = fitted, fitted_comps
    counts["data/truncated_prompts"] = float(sum(cut_p))
    counts["data/truncated_completions"] = float(sum(sum(c) for c in cut_c))  # each completion once
    enc = Encoded(
        prompts=prompts,
        first=[a[0] for a in answers],
        texts=rows,
        counts=counts,
        cut_to_context=cut_to_context,
    )
    if kind != "sft":
        enc.second = [a[1] for a in answers]
        enc.scores = torch.tensor([[r.score_chosen, r.score_rejected] for r in rows], dtype=torch.float32)
    return enc


def pad_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Left-padded prompts and right-padded completions with their masks (what
    `Policy.completion_logits` takes)."""
    n, p_len, c_len = len(prompts), max(map(len, prompts)), max(max(map(len, completions)), 1)
    p_ids = torch.full((n, p_len), pad_id, dtype=torch.long)
    p_mask = torch.zeros((n, p_len), dtype=torch.long)
    c_ids = torch.full((n, c_len), pad_id, dtype=torch.long)
    c_mask = torch.zeros((n, c_len), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if p:
            p_ids[i, p_len - len(p) :] = torch.tensor(p)
            p_mask[i, p_len - len(p) :] = 1
        if c:
            c_ids[i, : len(c)] = torch.tensor(c)
            c_mask[i, : len(c)] = 1
    return p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device)


PackedRow = tuple[list[int], list[int], list[int]]


def pack_rows(enc: Encoded, length: int) -> list[PackedRow]:
    """Greedy packing of prompt+completion examples into rows of at most ``length`` tokens.

    Each row is (ids, loss mask of the completion tokens, position ids restarting at each example).
    Hand-written because transformers' padding-free collator needs flash-attention: here attention is
    causal over the whole row, so an example can see the ones packed before it (TRL's classic
    packing); the position ids restart, and the loss still covers completion tokens only.
    """
    rows: list[PackedRow] = []
    ids: list[int] = []
    lab: list[int] = []
    pos: list[int] = []
    for p, c in zip(enc.prompts, enc.first):
        ex = p + c
        if ids and len(ids) + len(ex) > length:
            rows.append((ids, lab, pos))
            ids, lab, pos = [], [], []
        ids += ex
        lab += [0] * len(p) + [1] * len(c)
        pos += list(range(len(ex)))
    if ids:
        rows.append((ids, lab, pos))
    return rows
