"""``rlx eval RUN_DIR|CHECKPOINT ...``: held-out reward and exact-answer accuracy of runs' models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rlx eval", description="Held-out reward and exact accuracy of a run or checkpoint."
    )
    parser.add_argument(
        "paths", nargs="+", help="run directories (each uses its final/ model) or checkpoint directories"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--show", type=int, default=5, help="print N example completions")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON line")
    parser.add_argument(
        "--reward-fn",
        help="MODULE:FUNCTION for a reward=custom run (user code is never imported from the directory)",
    )
    ns = parser.parse_args(argv)
    results = {}
    for path in ns.paths:  # each checked and evaluated in turn; a bad one stops with its name
        results[path] = run_eval(argparse.Namespace(**{**vars(ns), "path": path}))
    if len(results) > 1 and not ns.json:
        compare_table(results)


def compare_table(results: dict[str, dict[str, float]]) -> None:
    """One row per evaluated model, one column per metric."""
    from rich.table import Table

    from rlx.tracking import console

    keys = sorted({k for m in results.values() for k in m})
    table = Table(title=f"rlx eval: {len(results)} models", title_justify="left")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for path, metrics in results.items():
        table.add_row(path, *(f"{metrics[k]:.4g}" if k in metrics else "-" for k in keys))
    console.print(table)


def run_eval(ns: argparse.Namespace) -> dict[str, float]:
    """``rlx eval``: rebuild the task and reward from the checkpoint's config and evaluate."""
    from rlx.checkpoint import read_dir_config, resolve_model_dir
    from rlx.evaluate import evaluate
    from rlx.models import Sampling, load_pretrained
    from rlx.rewards import REWARDS
    from rlx.runtime import resolve_device
    from rlx.tracking import console, summary_table
    from rlx.train import plan

    model_dir = resolve_model_dir(Path(ns.path))
    cfg = read_dir_config(model_dir, reward_fn=getattr(ns, "reward_fn", None))  # builds only rlx's own
    cfg.setdefault("trainer", {})["device"] = ns.device
    cfg["trainer"]["parallel"] = "auto"  # a model a ddp/fsdp2 run saved, evaluated in one process
    p = plan(cfg)  # re-checks the run's config (and its task) on this machine
    reward = REWARDS.resolve(p.cfg["reward"], where="reward")
    rollout = p.cfg["rollout"]
    sampling = Sampling(
        temperature=float(rollout["temperature"]),
        top_k=int(rollout["top_k"]),
        top_p=float(rollout["top_p"]),
        max_new_tokens=rollout["max_new_tokens"],
    )
    policy = load_pretrained(model_dir, p.task, str(cfg["model"].get("name", "model")))
    # as training read its prompts: through the chat template where model=hf used one
    policy.chat_template = bool(
        cfg["model"].get("chat_template") and getattr(policy.tokenizer, "chat_template", None)
    )
    policy.model.to(resolve_device(ns.device)).eval()
    metrics, rows = evaluate(
        policy,
        p.task,
        reward,
        sampling,
        greedy=not ns.sample,
        batch_size=int(p.cfg["eval"]["batch_size"]),
        limit=ns.limit,
    )
    if ns.json:
        print(json.dumps({"model_dir": str(model_dir), **metrics}))
        return metrics
    table = summary_table(f"rlx eval {model_dir}", {**metrics, "prompts": len(rows)})
    console.print(table)
    for row in rows[: ns.show]:
        mark = "✓" if row["exact"] else "✗"
        console.print(f"  {mark} {row['prompt']} -> {row['completion']}  reward={row['reward']:g}")
    return metrics
