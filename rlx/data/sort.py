"""Sort-task data for the offline pipeline: SFT demonstrations and scored preference pairs, as JSONL.

The texts use the sort task's own format (`SortTask.prompt_text`: numbers separated by spaces), so a
model trained on them is evaluated by ``rlx train task=sort`` / ``rlx eval`` as is. Every prompt
written here is outside the task's held-out evaluation set (drawn from the same ``task_seed`` and
``task_eval_size`` as ``task=sort``), and the held-out files' prompts are disjoint from the training
files', so held-out figures are held out twice over.

Each prompt gets K answers (``candidates``, default 4): the sorted one and K - 1 distinct wrong ones,
and contributes every pair of them whose scores differ, the better one chosen (a ranking read as its
comparisons, as InstructGPT trains its reward model). With K = 2 that is one pair, sorted vs wrong;
with K > 2 the reward model also learns which of two wrong answers is less wrong, which is most of
what it is asked during RL, where most samples are wrong. Measured on the RLHF pipeline (README, one
seed, the same SFT model and reward-model steps): trained on K = 2 pairs, the reward model agreed with
the true score on 0.92 of the within-prompt pairs of the SFT model's samples, and PPO on it peaked at
0.96 held-out exact and fell to 0.90 by the end; with K = 4, 0.97 and 0.98 at the end.

A wrong answer is a corrupted ordering of the sorted answer, one of: two different numbers
swapped; one number replaced by another value; the prompt's own (unsorted) order; a shuffle; a
number duplicated over its neighbour; the answer cut short (possibly empty); a sorted list with one
number replaced (sorted, but not the prompt's numbers; drawn twice as often, because a reward model
that only checks sortedness is what RL on it exploits first). Short answers matter
for RL on a learned reward model: a policy can stop early (EOS), and a reward model that never saw a
short answer scores it at random, which RL then exploits. Scores are the sort reward normalised to
[0, 1] (the share of the n positions that match the sorted answer), so the sorted answer scores 1.

With ``policy`` (a model directory, e.g. the SFT run's ``final/``), for a share of the prompts the
wrong answers are instead the model's own (distinct) wrong answers, sampled at temperature 1
(InstructGPT collects its comparisons on the SFT model's samples): the reward model then learns on
the mistakes the RL policy actually makes. The SFT files do not change (they depend on the prompts only).
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


def score(answer: list[int | None], target: list[int]) -> float:
    """The sort reward over n: the share of positions equal to the sorted answer (an answer longer
    than n is scored over its own length, so extra numbers never score 1)."""
    return sum(a == b for a, b in zip(answer, target)) / max(len(answer), len(target))


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
    candidates: int = 4,
) -> dict[str, Path]:
    """Write ``sft_{train,heldout}.jsonl`` and ``pairs_{train,heldout}.jsonl`` under ``out``.

    Each prompt gets ``candidates`` answers (the sorted one and ``candidates - 1`` distinct wrong
    ones) and contributes every pair of them with different scores (`_ranked_pairs`): with 2, one
    pair (sorted vs wrong); with K > 2 also pairs of two wrong answers, the less wrong one chosen.
    """
    if train < 1 or heldout < 1:
        raise RlxError(f"--train and --heldout must be >= 1, got {train} and {heldout}")
    _check_out_dir(out)
    if candidates < 2:
        raise RlxError(f"--candidates must be >= 2 (the sorted answer and a wrong one), got {candidates}")
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
    sampled: dict[tuple[int, ...], list[str]] = {}
    if policy:
        sampled = _policy_mistakes(policy, task, prompts, policy_share, policy_samples, candidates - 1, seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RlxError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from exc
    paths: dict[str, Path] = {}
    for split, part in (("train", prompts[:train]), ("heldout", prompts[train:])):
        sft, pairs = [], []
        for p in part:
            target = sorted(p)
            sft.append({"prompt": _text(p), "completion": _text(target)})
            # K - 1 distinct wrong answers: corruptions, the first ones replaced by the model's mistakes
            wrong: list[list[int] | str] = []
            for _ in range(candidates - 1):
                bad = corrupt(target, p, vocab, rng)
                for _retry in range(20):
                    if all(bad != w for w in wrong):
                        break
                    bad = corrupt(target, p, vocab, rng)
                wrong.append(bad)
            for k, mistake in enumerate(sampled.get(tuple(p), [])):
                wrong[k] = mistake
            pairs.extend(_ranked_pairs(_text(p), [target, *wrong], target))
        for name, rows in (("sft", sft), ("pairs", pairs)):
            path = out / f"{name}_{split}.jsonl"
            try:
                path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            except OSError as exc:
                raise RlxError(f"--out {out}: cannot write {path.name} ({exc.strerror or exc})") from exc
            paths[f"{name}_{split}"] = path
    return paths


def _check_out_dir(out: Path) -> None:
    """``--out`` is (or can become) a directory: checked before any work, creating nothing."""
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RlxError(f"--out {out}: {probe} is a file, not a directory")


def _ranked_pairs(prompt: str, answers: list[list[int] | str], target: list[int]) -> list[dict[str, object]]:
    """Every pair of ``answers`` whose scores differ, the better one chosen: a ranking of K answers
    read as its K(K-1)/2 comparisons, as InstructGPT (Ouyang et al. 2022, sec. 3.5) trains its reward
    model; ties carry no preference and are left out."""
    scored = [(a if isinstance(a, str) else _text(a), score(_numbers(a), target)) for a in answers]
    rows: list[dict[str, object]] = []
    for i, (a, sa) in enumerate(scored):
        for b, sb in scored[i + 1 :]:
            if sa == sb or a == b:
                continue
            (c, sc), (r, sr) = ((a, sa), (b, sb)) if sa > sb else ((b, sb), (a, sa))
            rows.append(
                {"prompt": prompt, "chosen": c, "rejected": r, "score_chosen": sc, "score_rejected": sr}
            )
    return rows


def _numbers(answer: list[int] | str) -> list[int | None]:
    if isinstance(answer, list):
        return list(answer)
    return [int(t) if t.isdigit() else None for t in answer.split()]


def _policy_mistakes(
    path: str, task: SortTask, prompts: list[list[int]], share: float, samples: int, most: int, seed: int
) -> dict[tuple[int, ...], list[str]]:
    """For ``share`` of the prompts, up to ``most`` distinct wrong answers among ``samples`` sampled
    from the model at ``path`` (as text)."""
    import torch

    from rlx.models import Sampling, load_pretrained

    policy = load_pretrained(path, task, "policy")
    policy.model.eval()
    rng = np.random.default_rng([seed, 0x5A3])
    chosen = [p for p in prompts if rng.random() < share]
    torch.manual_seed(seed)
    out: dict[tuple[int, ...], list[str]] = {}
    for start in range(0, len(chosen), 256):
        part = chosen[start : start + 256]
        rep = [p for p in part for _ in range(samples)]
        ids, mask = policy.encode(rep)
        tokens, comp_mask, _ = policy.generate(ids, mask, Sampling(max_new_tokens=task.length))
        answers = policy.decode(tokens, comp_mask)
        texts = policy.decode_text(tokens, comp_mask)
        for i, p in enumerate(part):
            found: list[str] = []
            for j in range(i * samples, (i + 1) * samples):
                text = texts[j].strip()
                if list(answers[j]) != sorted(p) and text != _text(sorted(p)) and text not in found:
                    found.append(text)
            if found:
                out[tuple(p)] = found[:most]
    return out
