"""Held-out evaluation: the configured reward and exact-answer accuracy on the task's eval set.

``eval/exact`` is the reward's verifier where it has one (``reward=math``, alone or as a component
of ``reward=combined``: math-verify's verdict on the greedy answer), else the task's own
``is_correct`` (the sort task's exact sort; a text task with ``task.ground_truth``).

Under torchrun (h11) the evaluation is sharded: rank r generates and scores only its contiguous share
of the held-out prompts (`shard_bounds`), and the ranks' per-prompt rows are gathered in rank order,
which is the single process's order. The metrics are then computed from the same rows in the same
order on every rank: equal to one process's, not merely close (an all-reduce of float sums would add
them in another order). The rows are small (text and a few numbers per prompt), so gathering them
costs little and gives rank 0's tracker the whole completions table."""

from __future__ import annotations

from typing import Any

import torch

from rlx import distributed
from rlx.errors import StopNow
from rlx.models import Policy, Sampling
from rlx.registry import Resolved
from rlx.rewards import max_reward_of, score_completions, verified_correct
from rlx.tasks import PromptBatch, Task
from rlx.tracking import publish_eval_rows


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
    per-prompt rows (every prompt's, on every rank). Every rank of a process group calls it."""
    batch = task.eval_batch()
    if limit is not None:
        batch = batch.select(list(range(min(limit, len(batch)))))
    max_reward = max_reward_of(reward)
    rank, world_size = distributed.world()
    lo, hi = shard_bounds(len(batch), rank, world_size)
    rows: list[dict[str, Any]] = []
    # No collective inside: the shares may differ by one prompt, so the ranks' numbers of batches too
    # (fsdp2: the parameters are gathered once for all of them, not once per generate call).
    with distributed.FullParameters(getattr(policy, "model", None)):
        for start in range(lo, hi, batch_size):
            if distributed.PENDING_SIGNAL:  # a signal after the last step (torchrun): stop generating
                break
            part = batch.select(list(range(start, min(start + batch_size, hi))))
            rows += _evaluate_part(policy, task, reward, sampling, part, greedy, max_reward)
    if world_size > 1 and (signum := distributed.signal_everywhere()) is not None:
        raise StopNow(signum)  # every rank, before the gather (rlx.train.StopSignals)
    rows = [row for share in distributed.gather_objects(rows) for row in share]  # the prompts' order
    n = max(len(rows), 1)
    metrics = {
        "eval/reward": sum(r["reward"] for r in rows) / n,
        "eval/exact": sum(r["exact"] for r in rows) / n,
    }
    if max_reward:
        metrics["eval/reward_norm"] = sum(r["reward"] / max(r["max_reward"], 1e-12) for r in rows) / n
    if rank == 0:
        publish_eval_rows(rows)  # a run's tracker logs them as an MLflow table beside these metrics
    return metrics, rows


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` held-out items: the first ``n % world_size``
    ranks take one more; a rank gets none when there are fewer items than ranks."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + int(rank < extra)


def _evaluate_part(
    policy: Policy,
    task: Task,
    reward: Resolved,
    sampling: Sampling,
    part: PromptBatch,
    greedy: bool,
    max_reward: Any,
) -> list[dict[str, Any]]:
    """Generate greedily, score and check one batch of held-out prompts: one row per prompt."""
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
    verified = verified_correct(reward, part.prompts, completions, columns)
    rows = []
    for i, (prompt, completion) in enumerate(zip(part.prompts, completions)):
        cols = {k: v[i] for k, v in columns.items() if k != "prompt_text"}
        exact = verified[i] if verified is not None else task.is_correct(prompt, completion, **cols)
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "prompt_text": columns["prompt_text"][i],
                "completion_text": columns["completion_text"][i],
                "reward": float(scores[i]),
                "exact": bool(exact),
                "max_reward": float(max_reward(prompt)) if max_reward else None,
            }
        )
    return rows
