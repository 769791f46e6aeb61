"""Held-out evaluation: the configured reward and exact-answer accuracy on the task's eval set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from rlx.errors import RlxError
from rlx.models import Policy, Sampling
from rlx.registry import Resolved
from rlx.rewards import REWARDS, score_completions
from rlx.tasks import Task


@torch.no_grad()
def evaluate(
    policy: Policy,
    task: Task,
    reward: Resolved,
    sampling: Sampling,
    *,
    greedy: bool = True,
    batch_size: int = 512,
    limit: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``eval/reward`` (mean reward; process rewards summed over tokens), ``eval/reward_norm`` (divided
    by the reward's maximum where it declares one), ``eval/exact`` (share answered exactly), and the
    per-prompt rows."""
    batch = task.eval_batch()
    if limit is not None:
        batch = batch.select(list(range(min(limit, len(batch)))))
    max_reward = reward.entry.meta.get("max_reward")
    rows: list[dict[str, Any]] = []
    for start in range(0, len(batch), batch_size):
        part = batch.select(list(range(start, min(start + batch_size, len(batch)))))
        ids, mask = policy.encode(part.prompts)
        tokens, comp_mask, _ = policy.generate(ids, mask, sampling, greedy=greedy)
        completions = policy.decode(tokens, comp_mask)
        columns = {
            **part.columns,
            "prompt_text": [task.prompt_text(x) for x in part.prompts],
            "completion_text": policy.decode_text(tokens, comp_mask),
        }
        scores = score_completions(reward, part.prompts, completions, columns, comp_mask)
        if scores.dim() == 2:
            scores = scores.sum(-1)
        for i, (prompt, completion) in enumerate(zip(part.prompts, completions)):
            cols = {k: v[i] for k, v in part.columns.items()}
            rows.append(
                {
                    "prompt": prompt,
                    "completion": completion,
                    "reward": float(scores[i]),
                    "exact": bool(task.is_correct(prompt, completion, **cols)),
                    "max_reward": float(max_reward(prompt)) if max_reward else None,
                }
            )
    n = max(len(rows), 1)
    metrics = {
        "eval/reward": sum(r["reward"] for r in rows) / n,
        "eval/exact": sum(r["exact"] for r in rows) / n,
    }
    if max_reward:
        metrics["eval/reward_norm"] = sum(r["reward"] / max(r["max_reward"], 1e-12) for r in rows) / n
    return metrics, rows


def resolve_model_dir(path: Path) -> Path:
    """A run directory's final model (or newest checkpoint), or a model directory itself."""
    from rlx.checkpoint import CONFIG_NAME, list_checkpoints

    if not path.exists():
        raise RlxError(f"{path} does not exist")
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "final" / CONFIG_NAME).is_file():
        return path / "final"
    checkpoints = list_checkpoints(path / "checkpoints")
    if checkpoints:
        return checkpoints[-1]
    raise RlxError(f"{path} is neither an rlx run directory nor a checkpoint (no {CONFIG_NAME} found)")


def run_eval(ns: argparse.Namespace) -> dict[str, float]:
    """``rlx eval``: rebuild the task and reward from the checkpoint's config and evaluate."""
    from omegaconf import OmegaConf

    from rlx.checkpoint import CONFIG_NAME
    from rlx.models import load_pretrained
    from rlx.tracking import console, summary_table
    from rlx.train import plan, resolve_device

    model_dir = resolve_model_dir(Path(ns.path))
    cfg = OmegaConf.load(model_dir / CONFIG_NAME)
    cfg.trainer.device = ns.device
    p = plan(cfg)  # re-checks the run's config (and its task) on this machine
    reward = REWARDS.resolve(p.cfg["reward"], where="reward")
    rollout = p.cfg["rollout"]
    sampling = Sampling(
        temperature=float(rollout["temperature"]),
        top_k=int(rollout["top_k"]),
        top_p=float(rollout["top_p"]),
        max_new_tokens=rollout["max_new_tokens"],
    )
    policy = load_pretrained(model_dir, p.task, str(cfg.model.get("name", "model")))
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
