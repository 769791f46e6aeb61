"""``rlx data arithmetic``: a verifiable-reward task small enough to learn on a CPU.

Prompts are "What is 37 + 58?"; the ``answer`` column is in GSM8K's format, a worked line and the
final answer after ``####`` ("37 + 58 = 95\\n#### 95"), so ``reward=math`` reads it exactly as it
reads GSM8K. Difficulty is set by the operands' digits, the operations and the number of terms.

Files (JSONL): ``train.jsonl`` (RL prompts), ``heldout.jsonl`` (evaluation prompts), and
``sft.jsonl`` (demonstrations for the SFT stage, ``completion`` in the R1 think-then-answer format,
one step per operation: ``<think>3+4=7,7+2=9</think><answer>9</answer>``). The three prompt sets
are disjoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlx.errors import RlxError

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _evaluate(terms: list[int], ops: list[str]) -> int:
    """The value with the usual precedence: products first, then sums and differences left to
    right (no ``eval``)."""
    values, signs = [terms[0]], []
    for op, t in zip(ops, terms[1:]):
        if op == "*":
            values[-1] = OPS["*"](values[-1], t)
        else:
            values.append(t)
            signs.append(op)
    total = values[0]
    for op, v in zip(signs, values[1:]):
        total = OPS[op](total, v)
    return total


def _problem(rng: np.random.Generator, digits: int, ops: str, terms: int) -> tuple[str, str, str]:
    """(expression, value, worked line) of one random problem."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    nums = [int(x) for x in rng.integers(lo, 10**digits, size=terms)]
    chosen = [str(rng.choice(list(ops))) for _ in range(terms - 1)]
    expr = " ".join(str(n) if i == 0 else f"{chosen[i - 1]} {n}" for i, n in enumerate(nums))
    value = _evaluate(nums, chosen)
    if "*" in chosen:  # precedence: one line
        return expr, str(value), f"{expr.replace(' ', '')}={value}"
    steps, running = [], nums[0]  # sums and differences: one step per operation, left to right
    for op, n in zip(chosen, nums[1:]):
        new = OPS[op](running, n)
        steps.append(f"{running}{op}{n}={new}")
        running = new
    return expr, str(value), ",".join(steps)


def write_arithmetic_data(
    out: Path,
    *,
    digits: int = 1,
    ops: str = "+",
    terms: int = 3,
    train: int = 200,
    heldout: int = 500,
    sft: int = 200,
    seed: int = 0,
) -> dict[str, Path]:
    """Write train/heldout/sft JSONL files under ``out``; returns their paths."""
    if digits < 1 or terms < 2:
        raise RlxError(f"--digits must be >= 1 and --terms >= 2, got {digits} and {terms}")
    if not ops or set(ops) - set(OPS):
        raise RlxError(f"--ops must be made of {''.join(OPS)}, got {ops!r}")
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    space = (10**digits - lo) ** terms * len(set(ops)) ** (terms - 1)  # distinct expressions
    need = train + heldout + sft
    # Rejection sampling draws about space * ln(space / (space - need)) problems: cheap up to 90% of
    # the space (3 one-digit terms: 1000 problems, so 500 held-out prompts fit beside 400 others).
    if need > 0.9 * space:
        raise RlxError(
            f"{need} distinct problems asked, but only {space} exist (at most 90% can be drawn); "
            "raise --digits or --terms"
        )
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < need:
        expr, value, worked = _problem(rng, digits, ops, terms)
        if expr in seen:
            continue
        seen.add(expr)
        rows.append(
            {
                "prompt": f"What is {expr}?",
                "answer": f"{expr} = {value}\n#### {value}",
                "completion": f"<think>{worked}</think><answer>{value}</answer>",
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": rows[:train], "heldout": rows[train : train + heldout], "sft": rows[train + heldout :]}
    paths = {}
    for name, part in parts.items():
        path = out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in part:
                if name != "sft":
                    row = {"prompt": row["prompt"], "answer": row["answer"]}
                f.write(json.dumps(row) + "\n")
        paths[name] = path
    return paths
