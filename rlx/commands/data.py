"""``rlx data``: write datasets (`rlx data sort --out DIR`, `rlx data arithmetic --out DIR`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rlx data", description="Write datasets for the offline algorithms."
    )
    sub = parser.add_subparsers(dest="what", required=True)
    sort = sub.add_parser(
        "sort",
        help="sort-task SFT demonstrations and preference pairs (train and held-out JSONL)",
        description="SFT demonstrations (prompt -> sorted list) and scored preference pairs (every pair "
        "of --candidates answers with different scores: the sorted one and corrupted ones) in the sort "
        "task's own text format. Prompts avoid the task's held-out "
        "eval set (same --length/--vocab/--task-seed/--task-eval-size as task=sort).",
    )
    sort.add_argument("--out", required=True, help="output directory")
    sort.add_argument("--length", type=int, default=4, help="numbers per prompt (task.length)")
    sort.add_argument("--vocab", type=int, default=10, help="numbers are 0..vocab-1 (task.vocab)")
    sort.add_argument("--train", type=int, default=4000, help="training prompts")
    sort.add_argument("--heldout", type=int, default=500, help="held-out prompts")
    sort.add_argument("--seed", type=int, default=0, help="seed of the draw and of the corruptions")
    sort.add_argument("--task-seed", type=int, default=1234, help="task.seed of the eval set to avoid")
    sort.add_argument("--task-eval-size", type=int, default=500, help="task.eval_size of that eval set")
    sort.add_argument(
        "--policy", help="a model directory: take a share of the rejected answers from its samples"
    )
    sort.add_argument(
        "--policy-share", type=float, default=0.5, help="share of prompts with sampled wrong answers"
    )
    sort.add_argument(
        "--candidates",
        type=int,
        default=4,
        help="answers per prompt (the sorted one + K-1 wrong ones); every pair with different scores "
        "becomes a preference pair, so K > 2 also ranks wrong answers against each other",
    )
    arith = sub.add_parser(
        "arithmetic",
        help="arithmetic word problems with GSM8K-format answers (RL prompts, held-out prompts, SFT demos)",
        description="Prompts 'What is 3 + 4 + 2?' (--digits 2 --terms 2: 'What is 37 + 58?') with an "
        "answer column in GSM8K's format "
        "('3 + 4 + 2 = 9\\n#### 9'): train.jsonl and heldout.jsonl (prompt, answer) and sft.jsonl "
        "(prompt, completion in the R1 think-then-answer format, answer), disjoint. For task=text "
        "reward=math (experiment=arithmetic_r1).",
    )
    arith.add_argument("--out", required=True, help="output directory")
    arith.add_argument("--digits", type=int, default=1, help="digits per operand (difficulty)")
    arith.add_argument("--ops", default="+", help="operations to draw from, e.g. '+-*' (difficulty)")
    arith.add_argument("--terms", type=int, default=3, help="operands per problem (difficulty)")
    arith.add_argument("--train", type=int, default=200, help="RL training prompts")
    arith.add_argument(
        "--heldout",
        type=int,
        default=500,
        help="held-out prompts (500: enough to tell a 0.05 gain from noise)",
    )
    arith.add_argument("--sft", type=int, default=200, help="SFT demonstrations")
    arith.add_argument("--seed", type=int, default=0, help="seed of the draw")
    ns = parser.parse_args(argv)
    if ns.what == "arithmetic":
        from rlx.data.arithmetic import write_arithmetic_data

        written = write_arithmetic_data(
            Path(ns.out),
            digits=ns.digits,
            ops=ns.ops,
            terms=ns.terms,
            train=ns.train,
            heldout=ns.heldout,
            sft=ns.sft,
            seed=ns.seed,
        )
        for name, path in written.items():
            print(f"{name:14s} {path}")
        return
    from rlx.data.sort import write_sort_data

    paths = write_sort_data(
        Path(ns.out),
        length=ns.length,
        vocab=ns.vocab,
        train=ns.train,
        heldout=ns.heldout,
        seed=ns.seed,
        task_seed=ns.task_seed,
        task_eval_size=ns.task_eval_size,
        policy=ns.policy,
        policy_share=ns.policy_share,
        candidates=ns.candidates,
    )
    for name, path in paths.items():
        print(f"{name:14s} {path}")
