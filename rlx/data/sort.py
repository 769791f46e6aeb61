"""Sort-task data for the offline pipeline: SFT demonstrations and scored preference pairs, as JSONL.

The texts use the sort task's own format (`SortTask.prompt_text`: numbers separated by spaces), so a
model trained on them is evaluated by ``rlx train task=sort`` / ``rlx eval`` as is. Every prompt
written here is outside the task's held-out evaluation set (drawn from the same ``task_seed`` and
``task_eval_size`` as ``task=sort``), and the held-out files' prompts are disjoint from the training
files', so held-out figures are held out twice over.

A rejected answer is a corrupted ordering of the sorted answer, one of: two different numbers
swapped; one number replaced by another value; the prompt's own (unsorted) order; a shuffle; a
number duplicated over its neighbour; the answer cut short (possibly empty); a sorted list with one
number replaced (sorted, but not the prompt's numbers; drawn twice as often, because a reward model
that only checks sortedness is what RL on it exploits first). Short answers matter
for RL on a learned reward model: a policy can stop early (EOS), and a reward model that never saw a
short answer scores it at random, which RL then exploits. Scores are the sort reward normalised to
[0, 1] (the share of the n positions that match the sorted answer), so the chosen answer scores 1.

With ``policy`` (a model directory, e.g. the SFT run's ``final/``), a share of the rejected answers are
instead the model's own wrong answers, sampled at temperature 1 (InstructGPT collects its comparisons
on the SFT model's samples): the reward model then learns on the mistakes the RL policy actually
makes. The SFT files do not change (they depend on the prompts only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlx.errors import RlxError
from rlx.tasks.sort import SortTask


def _text(xs: list[int]) -> str:
    return " ".join(str(x) for x in xs)


def corrupt(target: list[int], prompt: list[int], vocab: int, rng: np.random.Generator) -> list[int]:
    """A wrong answer for ``prompt`` (never equal to ``target``, the sorted prompt)."""
    n = len(target)
    for _ in range(100):
        kind = int(rng.integers(0, 8))
        out = list(target)
        if kind == 0 and n > 1:  # swap two positions holding different numbers
            i, j = (int(x) for x in rng.choice(n, size=2, replace=False))
            out[i], out[j] = out[j], out[i]
        elif kind == 1:  # one number replaced by another value
            i = int(rng.integers(0, n))
            out[i] = int((out[i] + rng.integers(1, vocab)) % vocab)
        elif kind == 2:  # the prompt's own order
            out = list(prompt)
        elif kind == 3:  # a shuffle
            out = [target[int(k)] for k in rng.permutation(n)]
        elif kind == 4 and n > 1:  # a number duplicated over its neighbour
            i = int(rng.integers(0, n - 1))
            out[i + 1] = out[i]
        elif kind == 5:  # cut short: the first k numbers, k < n (k = 0: an empty answer)
            out = out[: int(rng.integers(0, n))]
        elif kind >= 6:  # sorted, but one number replaced: the wrong numbers in the right order
            i = int(rng.integers(0, n))
            out[i] = int((out[i] + rng.integers(1, vocab)) % vocab)
            out = sorted(out)
        if out != target:
            return out
    out = list(target)
    out[0] = (out[0] + 1) % vocab
    return out


def score(answer: list[int], target: list[int]) -> float:
    """The sort reward over n: the share of positions equal to the sorted answer."""
    return sum(a == b for a, b in zip(answer, target)) / len(target)


def write_sort_data(
    out: Path,
    *,
    length: int = 4,
    vocab: int = 10,
    train: int = 4000,
    heldout: int = 500,
    seed: int = 0,
    task_seed: int = 1234,
    task_eval_size: int = 500,
    policy: str | None = None,
    policy_share: float = 0.5,
    policy_samples: int = 8,
) -> dict[str, Path]:
    """Write ``sft_{train,heldout}.jsonl`` and ``pairs_{train,heldout}.jsonl`` under ``out``."""
    if train < 1 or heldout < 1:
        raise RlxError(f"--train and --heldout must be >= 1, got {train} and {heldout}")
    task = SortTask(length=length, vocab=vocab, eval_size=task_eval_size, seed=task_seed)
    excluded = {tuple(p) for p in task.eval_batch().prompts}
    space = vocab**length - len(excluded)
    if train + heldout > space:
        raise RlxError(
            f"only {space} prompts lie outside the task's eval set (vocab={vocab}, length={length}); "
            f"asked for {train} + {heldout}"
        )
    rng = np.random.default_rng([seed, 0xDA7A])
    seen: set[tuple[int, ...]] = set()
    prompts: list[list[int]] = []
    while len(prompts) < train + heldout:
        p = tuple(int(x) for x in rng.integers(0, vocab, size=length))
        if p in excluded or p in seen:
            continue
        seen.add(p)
        prompts.append(list(p))
    if not 0.0 <= policy_share <= 1.0:
        raise RlxError(f"--policy-share must be in [0, 1], got {policy_share}")
    sampled = _policy_mistakes(policy, task, prompts, policy_share, policy_samples, seed) if policy else {}
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, part in (("train", prompts[:train]), ("heldout", prompts[train:])):
        sft, pairs = [], []
        for p in part:
            target = sorted(p)
            sft.append({"prompt": _text(p), "completion": _text(target)})
            bad = corrupt(target, p, vocab, rng)
            mistake = sampled.get(tuple(p))
            if mistake is not None:
                bad = mistake
            pairs.append(
                {
                    "prompt": _text(p),
                    "chosen": _text(target),
                    "rejected": bad if isinstance(bad, str) else _text(bad),
                    "score_chosen": 1.0,
                    "score_rejected": score(_numbers(bad), target),
                }
            )
        for name, rows in (("sft", sft), ("pairs", pairs)):
            path = out / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            paths[f"{name}_{split}"] = path
    return paths


def _numbers(answer: list[int] | str) -> list[int | None]:
    if isinstance(answer, list):
        return list(answer)
    return [int(t) if t.isdigit() else None for t in answer.split()]


def _policy_mistakes(
    path: str, task: SortTask, prompts: list[list[int]], share: float, samples: int, seed: int
) -> dict[tuple[int, ...], str]:
    """For ``share`` of the prompts, one wrong answer sampled from the model at ``path`` (as text)."""
    import torch

    from rlx.models import Sampling, load_pretrained

    policy = load_pretrained(path, task, "policy")
    policy.model.eval()
    rng = np.random.default_rng([seed, 0x5A3])
    chosen = [p for p in prompts if rng.random() < share]
    torch.manual_seed(seed)
    out: dict[tuple[int, ...], str] = {}
    for start in range(0, len(chosen), 256):
        part = chosen[start : start + 256]
        rep = [p for p in part for _ in range(samples)]
        ids, mask = policy.encode(rep)
        tokens, comp_mask, _ = policy.generate(ids, mask, Sampling(max_new_tokens=task.length))
        answers = policy.decode(tokens, comp_mask)
        texts = policy.decode_text(tokens, comp_mask)
        for i, p in enumerate(part):
            for j in range(i * samples, (i + 1) * samples):
                if list(answers[j]) != sorted(p) and texts[j].strip() != _text(sorted(p)):
                    out[tuple(p)] = texts[j].strip()
                    break
    return out
