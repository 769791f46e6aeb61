"""Per-step numbers of short seed-0 runs of every loop, recorded before a refactor and compared after.

    python scripts/numbers.py record outputs/numbers/before      # with the code before the change
    python scripts/numbers.py record outputs/numbers/after       # with the code after it
    python scripts/numbers.py compare outputs/numbers/before outputs/numbers/after

Each case is the real `rlx train ...` in a fresh process, one thread (OMP_NUM_THREADS=1), CPU,
logger=none, 30 iterations (TRPO 10) with a held-out evaluation every 10. The offline cases train on
`rlx data sort` output written into the record directory (SFT first; RM and DPO start from its model).
`compare` prints, per case, whether every per-step value (wall-clock figures aside) is bit-identical,
and otherwise the largest relative difference per metric.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RLX = shutil.which("rlx", path=str(Path(sys.executable).parent)) or "rlx"
VOLATILE = ("time", "throughput")
SHORT = ["trainer.seed=0", "trainer.device=cpu", "logger=none", "trainer.eval_every=10", "task.eval_size=100"]
ONLINE = [*SHORT, "trainer.steps=30"]


def cases(root: Path) -> dict[str, list[str]]:
    data = root / "data"
    sft_final = root / "sft" / "final"
    offline = [*SHORT, "trainer.steps=30", "algo.batch_size=16"]
    return {
        "grpo": ["algo=grpo", *ONLINE],
        "dr_grpo": ["algo=dr_grpo", *ONLINE],
        "dapo": ["algo=dapo", *ONLINE],
        "rloo": ["algo=rloo", *ONLINE],
        "reinforce": ["algo=reinforce", *ONLINE],
        "grpo_sort_tokens": ["algo=grpo", "reward=sort_tokens", *ONLINE],
        "ppo_head": ["algo=ppo", *ONLINE],
        "ppo_separate": ["algo=ppo", "algo.critic=separate", *ONLINE],
        "ppo_adaptive": ["algo=ppo", "+ADAPTIVE", "algo.epochs=2", "algo.minibatches=2", *ONLINE],
        "trpo": ["algo=trpo", *SHORT, "trainer.steps=10", "trainer.eval_every=5"],
        "sft": [
            "algo=sft",
            f"data.train={data}/sft_train.jsonl",
            f"data.eval={data}/sft_heldout.jsonl",
            *offline,
        ],
        "rm": [
            "algo=rm",
            f"model.init_from={sft_final}",
            f"data.train={data}/pairs_train.jsonl",
            f"data.eval={data}/pairs_heldout.jsonl",
            *offline,
        ],
        "dpo": [
            "algo=dpo",
            f"model.init_from={sft_final}",
            f"data.train={data}/pairs_train.jsonl",
            f"data.eval={data}/pairs_heldout.jsonl",
            *offline,
        ],
    }


def adaptive_keys(root: Path) -> list[str]:
    """The adaptive-KL override under whichever name this checkout's config uses."""
    conf = (Path(__file__).resolve().parents[1] / "conf" / "kl" / "k1.yaml").read_text()
    if "adaptive_target" in conf:
        return ["kl.adaptive_target=6", "kl.adaptive_horizon=10000"]
    return ["algo.kl_target=6", "algo.kl_horizon=10000"]


def record(root: Path, only: list[str] | None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    if not (root / "data" / "sft_train.jsonl").is_file():
        subprocess.run(
            [RLX, "data", "sort", "--out", str(root / "data"), "--train", "400", "--heldout", "64"],
            check=True,
            env=env,
        )
    for name, args in cases(root).items():
        if only and name not in only:
            continue
        if "+ADAPTIVE" in args:
            i = args.index("+ADAPTIVE")
            args = [*args[:i], *adaptive_keys(root), *args[i + 1 :]]
        started = time.perf_counter()
        res = subprocess.run(
            [RLX, "train", *args, f"hydra.run.dir={root / name}"],
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.perf_counter() - started
        if res.returncode != 0:
            print(f"{name}: FAILED ({res.returncode})\n{res.stderr[-3000:]}")
            sys.exit(1)
        print(f"{name}: {took:.1f} s")


def rows(path: Path) -> list[dict[str, float]]:
    out = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if not k.startswith(VOLATILE)})
    return out


def compare(a: Path, b: Path) -> int:
    worst_case = 0.0
    for name in cases(a):
        if not (a / name / "metrics.jsonl").is_file() or not (b / name / "metrics.jsonl").is_file():
            print(f"{name:18s} missing")
            continue
        ra, rb = rows(a / name), rows(b / name)
        if ra == rb:
            print(f"{name:18s} bit-identical ({len(ra)} rows)")
            continue
        if [r["step"] for r in ra] != [r["step"] for r in rb]:
            print(f"{name:18s} different steps")
            worst_case = math.inf
            continue
        diffs: dict[str, float] = {}
        keys_only: set[str] = set()
        for x, y in zip(ra, rb):
            for k in set(x) | set(y):
                if k not in x or k not in y:
                    keys_only.add(k)
                    continue
                den = max(abs(x[k]), abs(y[k]), 1e-12)
                diffs[k] = max(diffs.get(k, 0.0), abs(x[k] - y[k]) / den)
        changed = {k: v for k, v in diffs.items() if v > 0}
        worst = max(changed.values(), default=0.0)
        worst_case = max(worst_case, worst)
        top = ", ".join(f"{k} {v:.1e}" for k, v in sorted(changed.items(), key=lambda kv: -kv[1])[:4])
        extra = f"; keys in one only: {sorted(keys_only)}" if keys_only else ""
        print(f"{name:18s} max relative difference {worst:.1e} ({top}){extra}")
    print(f"largest relative difference over all cases: {worst_case:.1e}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--only", nargs="*")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    ns = parser.parse_args()
    if ns.cmd == "record":
        record(ns.out, ns.only)
    else:
        sys.exit(compare(ns.a, ns.b))


if __name__ == "__main__":
    main()
