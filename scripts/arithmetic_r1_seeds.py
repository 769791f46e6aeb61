"""The README's ``experiment=arithmetic_r1`` table: SFT, then GRPO, per seed, with a paired test.

For each seed, the three commands of the README run as a user would run them (fresh processes,
``logger=none``, ``trainer.seed=S``, everything under ``<out>/s<S>``), timed stage by stage:

    rlx data arithmetic --out <out>/s<S>/data
    rlx train experiment=arithmetic_r1 algo=sft  arith.dir=<out>/s<S> trainer.seed=S logger=none
    rlx train experiment=arithmetic_r1 algo=grpo arith.dir=<out>/s<S> trainer.seed=S logger=none

Then both final models answer the same held-out prompts greedily (as ``rlx eval`` does) and the
answers are compared prompt by prompt: ``fixed`` = wrong after SFT, right after GRPO; ``broken`` =
the reverse. The gain's p-value is McNemar's exact test (a two-sided binomial test of ``fixed``
against ``fixed + broken`` at 1/2), which is the test for two classifiers scored on the same items;
the standard error of the gain is that of a paired difference, sqrt(fixed + broken - gain^2 n) / n.

    python scripts/arithmetic_r1_seeds.py --out /tmp/arith --seeds 0,1,2 --jobs 1
    python scripts/arithmetic_r1_seeds.py --out /tmp/arith --seeds 0,1,2 --eval-only
    python scripts/arithmetic_r1_seeds.py --out /tmp/arith --seeds 0 -- trainer.steps=300   # GRPO overrides
    python scripts/arithmetic_r1_seeds.py --out /tmp/arith60 --seeds 0,1,2 --sft arith.epochs.sft=60

Prints a markdown table and writes ``<out>/results.json``.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RLX = shutil.which("rlx", path=str(Path(sys.executable).parent)) or "rlx"
# scripts/numbers.py would shadow the standard library's `numbers` (which torch imports) when this
# file runs as a script, since Python puts the script's folder first on sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def run_stage(cmd: list[str], log: Path) -> float:
    """Run one CLI command (one thread, as on the shared machine); its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def pipeline(out: Path, seed: int, grpo_overrides: list[str], sft_overrides: list[str]) -> dict[str, float]:
    """data -> SFT -> GRPO for one seed; wall seconds per stage."""
    d = out / f"s{seed}"
    d.mkdir(parents=True, exist_ok=True)
    common = ["experiment=arithmetic_r1", f"arith.dir={d}", f"trainer.seed={seed}", "logger=none", "-q"]
    times = {"data_s": run_stage([RLX, "data", "arithmetic", "--out", str(d / "data")], d / "data.log")}
    times["sft_s"] = run_stage([RLX, "train", *common, "algo=sft", *sft_overrides], d / "sft.log")
    times["grpo_s"] = run_stage([RLX, "train", *common, "algo=grpo", *grpo_overrides], d / "grpo.log")
    times["pipeline_s"] = sum(times.values())
    (d / "times.json").write_text(json.dumps(times), encoding="utf-8")
    return times


def heldout_exact(run_dir: Path) -> list[bool]:
    """Math-verify's verdict on the run's final model's greedy answer to each held-out prompt (what
    ``rlx eval RUN`` averages into eval/exact)."""
    from rlx.checkpoint import read_dir_config, resolve_model_dir
    from rlx.evaluate import evaluate
    from rlx.models import Sampling, load_pretrained
    from rlx.rewards import REWARDS
    from rlx.train import plan

    model_dir = resolve_model_dir(run_dir)
    cfg = read_dir_config(model_dir)
    cfg.setdefault("trainer", {})["device"] = "cpu"
    p = plan(cfg)
    reward = REWARDS.resolve(p.cfg["reward"], where="reward")
    r = p.cfg["rollout"]
    sampling = Sampling(float(r["temperature"]), int(r["top_k"]), float(r["top_p"]), r["max_new_tokens"])
    policy = load_pretrained(model_dir, p.task, str(cfg["model"].get("name", "model")))
    policy.chat_template = bool(cfg["model"].get("chat_template"))
    policy.model.eval()
    _, rows = evaluate(policy, p.task, reward, sampling, greedy=True)
    return [bool(row["exact"]) for row in rows]


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - n/2| >= |fixed - n/2|), X ~ Binomial(n, 1/2)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(out: Path, seed: int) -> dict[str, float]:
    """SFT vs GRPO on the same held-out prompts, plus GRPO's format reward and the stage times."""
    d = out / f"s{seed}"
    sft, grpo = heldout_exact(d / "sft"), heldout_exact(d / "grpo")
    n = len(sft)
    fixed = sum(1 for a, b in zip(sft, grpo) if b and not a)
    broken = sum(1 for a, b in zip(sft, grpo) if a and not b)
    gain = (fixed - broken) / n
    rows = [json.loads(x) for x in (d / "grpo" / "metrics.jsonl").read_text().splitlines()]
    fmt = [r["reward/format"] for r in rows if "reward/format" in r][-10:]
    times_path = d / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    return {
        "seed": seed,
        "n": n,
        "sft": sum(sft) / n,
        "grpo": sum(grpo) / n,
        "gain": gain,
        "gain_se": math.sqrt(max(fixed + broken - gain**2 * n, 0.0)) / n,
        "fixed": fixed,
        "broken": broken,
        "p_mcnemar": mcnemar_exact_p(fixed, broken),
        "format_last10": sum(fmt) / max(len(fmt), 1),
        **times,
    }


def table(results: list[dict[str, float]]) -> str:
    head = (
        "| seed | SFT held-out acc. | GRPO held-out acc. | gain ± s.e. | fixed / broken | McNemar p "
        "| format (last 10 it.) | data + SFT / GRPO / pipeline |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in results:
        t = (
            f"{r['data_s'] + r['sft_s']:.0f} s / {r['grpo_s']:.0f} s / {r['pipeline_s']:.0f} s"
            if "pipeline_s" in r
            else "-"
        )
        lines.append(
            f"| {r['seed']} | {r['sft']:.3f} | {r['grpo']:.3f} | {r['gain']:+.3f} ± {r['gain_se']:.3f} "
            f"| {r['fixed']} / {r['broken']} | {r['p_mcnemar']:.2g} | {r['format_last10']:.3f} | {t} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="one folder per seed is made here")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated trainer.seed values")
    parser.add_argument("--jobs", type=int, default=1, help="pipelines side by side (this CPU: 2 at most)")
    parser.add_argument("--eval-only", action="store_true", help="compare existing runs under --out")
    parser.add_argument(
        "--sft",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="an override for the SFT stage, e.g. --sft arith.epochs.sft=60 (repeatable)",
    )
    parser.add_argument("grpo_overrides", nargs="*", help="extra overrides for the GRPO stage")
    ns = parser.parse_args()
    seeds = [int(s) for s in ns.seeds.split(",")]
    if not ns.eval_only:
        with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
            list(pool.map(lambda s: pipeline(ns.out, s, ns.grpo_overrides, ns.sft), seeds))
    import torch

    torch.set_num_threads(1)
    results = [compare(ns.out, s) for s in seeds]
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
