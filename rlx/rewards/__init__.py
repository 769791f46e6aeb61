"""Reward functions.

Interface: ``reward(prompts, completions, *, <task columns>, <hyperparameters>) -> scores``; scores are
one float per completion (an outcome reward) or one list of floats per completion, one per completion
token (a process reward, registered with ``process=True``). Task columns (``ground_truth``) are
keyword-only parameters without defaults; hyperparameters have defaults and are set from YAML.
A reward with ``**columns`` receives every column of the task (``task=text``: every column of the
dataset, as TRL passes them), one value per completion.

``reward=combined`` (`combined_reward`) is a weighted sum of other rewards; `score_completions`
scores each component, reports its mean as ``reward/<name>`` and returns the total.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.registry import Registry, Resolved, check_type

REWARDS = Registry("reward", ["rlx.rewards"])


def load_callable(spec: str, *, where: str) -> Callable[..., Any]:
    """Import ``module:function`` (or ``module.function``) named in the config."""
    module, sep, attr = spec.partition(":")
    if not sep:
        module, _, attr = spec.rpartition(".")
    if not module or not attr:
        raise RlxError(f"{where}={spec!r} must look like 'my_module:my_function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise RlxError(f"{where}={spec!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise RlxError(f"{where}={spec!r} is not callable")
    return fn


def accepted_columns(fn: Callable[..., Any], columns: dict[str, Any]) -> dict[str, Any]:
    """The task columns ``fn`` takes by name (all of them if it has ``**kwargs``, except columns
    named like one of its own parameters: those are its hyperparameters)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in columns.items() if k not in params}
    return {k: v for k, v in columns.items() if k in params}


@REWARDS.register("custom")
def custom_reward(prompts: list[Any], completions: list[Any], *, fn: str = "", **columns: Any) -> Any:
    """A user's reward, ``reward=custom reward.fn=my_module:my_reward``.

    ``my_reward(prompts, completions, **task_columns)`` returns one float per completion (outcome) or
    one list per completion with a float per token (process).
    """
    user_fn = load_callable(fn, where="reward.fn")
    return user_fn(prompts, completions, **accepted_columns(user_fn, columns))


def _is_process(scores: list[Any]) -> bool:
    """A process reward returns a sequence of per-token scores for each completion."""
    return bool(scores) and hasattr(scores[0], "__len__") and not isinstance(scores[0], str)


def score_completions(
    reward: Resolved,
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]],
    mask: Tensor,
    metrics: dict[str, float] | None = None,
) -> Tensor:
    """Call a resolved reward on a batch and check what comes back.

    Returns a float32 tensor: ``[N]`` for an outcome reward, ``[N, T]`` (0 on padding) for a process
    reward. A reward that raises, returns the wrong number of scores, or returns NaN/inf stops the run
    with an error that shows the offending prompt and completion. For ``reward=combined`` the result
    is the weighted sum of the components, and ``metrics`` (when given) receives each component's
    mean sequence reward as ``reward/<component>``.
    """
    if reward.entry.meta.get("combined"):
        return _score_combined(reward, prompts, completions, columns, mask, metrics)
    fn = reward.entry.fn
    cols = accepted_columns(fn, columns)
    name = reward.name if reward.name != "custom" else reward.kwargs.get("fn", "custom")
    try:
        scores = reward(prompts, completions, **cols)
    except RlxError:
        raise
    except Exception as exc:
        row = _first_failing_row(reward, prompts, completions, cols)
        where = f" on prompt {prompts[row]!r}, completion {completions[row]!r}" if row is not None else ""
        raise RlxError(f"reward {name!r} raised {type(exc).__name__}: {exc}{where}") from exc
    scores = list(scores)
    n, t = mask.shape
    if len(scores) != n:
        raise RlxError(f"reward {name!r} returned {len(scores)} scores for {n} completions")
    if not _is_process(scores):
        out = torch.tensor([_score(s, name, prompts[i], completions[i]) for i, s in enumerate(scores)])
        bad = (~torch.isfinite(out)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise RlxError(
                f"reward {name!r} returned {scores[i]} for prompt {prompts[i]!r}, "
                f"completion {completions[i]!r}"
            )
        return out.to(mask.device)
    lengths = mask.sum(-1).long().tolist()
    out = torch.zeros(n, t, dtype=torch.float32)
    for i, (row, length) in enumerate(zip(scores, lengths)):
        row = [_score(x, name, prompts[i], completions[i]) for x in row]
        if len(row) != length:
            raise RlxError(
                f"process reward {name!r} returned {len(row)} scores for a completion of {length} "
                f"tokens (prompt {prompts[i]!r}, completion {completions[i]!r})"
            )
        vals = torch.tensor(row, dtype=torch.float32)
        if not torch.isfinite(vals).all():
            raise RlxError(
                f"reward {name!r} returned a non-finite score for prompt {prompts[i]!r}, "
                f"completion {completions[i]!r}"
            )
        out[i, :length] = vals
    return out.to(mask.device)


def _score(value: Any, name: str, prompt: Any, completion: Any) -> float:
    """One score as a float, or one line naming the reward and what it returned instead of a number."""
    if not isinstance(value, (str, bytes)) and value is not None:
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise RlxError(
        f"reward {name!r} returned {value!r} ({type(value).__name__}), not a number, for prompt {prompt!r}, "
        f"completion {completion!r}"
    )


def _first_failing_row(
    reward: Resolved, prompts: list[Any], completions: list[Any], cols: dict[str, list[Any]]
) -> int | None:
    for i in range(len(prompts)):
        try:
            reward([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in cols.items()})
        except Exception:
            return i
    return None


# -- combined rewards ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One term of a combined reward: its name (the key under ``reward.components``), the bound
    reward and its weight."""

    name: str
    reward: Resolved
    weight: float


def reward_components(reward: Resolved) -> list[Component]:
    """The components of ``reward=combined``, resolved and checked (one line on bad input)."""
    nodes = reward.kwargs.get("components") or {}
    weights = dict(reward.kwargs.get("weights") or {})
    if not isinstance(nodes, Mapping) or not nodes:
        raise RlxError(
            "reward=combined needs components, e.g. reward=combined 'reward/components=[math,format]'"
        )
    if not isinstance(weights, Mapping):
        raise RlxError(f"reward.weights must map component names to numbers, got {weights!r}")
    unknown = sorted(set(weights) - set(nodes))
    if unknown:
        raise RlxError(
            f"reward.weights names {', '.join(unknown)}, not among the components "
            f"({', '.join(map(str, nodes))})"
        )
    out = []
    for name, node in nodes.items():
        where = f"reward.components.{name}"
        resolved = REWARDS.resolve(node, where=where)
        if resolved.entry.meta.get("combined"):
            raise RlxError(f"{where}: a combined reward cannot be a component of another one")
        w = weights.get(name, 1.0)
        check_type(f"reward.weights.{name}", w, float)
        out.append(Component(str(name), resolved, float(w)))
    kinds = {c.name: bool(c.reward.entry.meta.get("process")) for c in out}
    if len(set(kinds.values())) > 1:
        raise RlxError(_MIXED.format(", ".join(k for k, p in kinds.items() if p)))
    return out


_MIXED = (
    "reward=combined mixes a process reward ({}) with outcome rewards: a per-token and a per-sequence "
    "score have no common scale or position to add up at; combine rewards of one kind"
)


def check_combined(kwargs: dict[str, Any]) -> None:
    """Start-up check of ``reward=combined``: every component resolves, weights name components, no
    process/outcome mix, and each component's own start-up check passes."""
    for c in reward_components(Resolved(REWARDS.get("combined"), kwargs, {})):
        check = c.reward.entry.meta.get("check")
        if check is not None:
            check(dict(c.reward.kwargs))


@REWARDS.register("combined", combined=True, check=check_combined)
def combined_reward(
    prompts: list[Any],
    completions: list[Any],
    *,
    components: dict[str, Any] | None = None,
    weights: dict[str, float] | None = None,
    **columns: Any,
) -> list[Any]:
    """r = sum_k w_k r_k over the components (``reward.components.<name>``, ``reward.weights.<name>``,
    default 1), as TRL sums ``reward_funcs`` with ``reward_weights`` and verl adds format and answer
    scores. Outcome components give one total per completion; process components (all of them)
    give per-token totals. `score_completions` computes the same sum and logs each term; this
    function serves callers that want the total alone."""
    node = Resolved(REWARDS.get("combined"), {"components": components, "weights": weights}, {})
    total: list[Any] | None = None
    for c in reward_components(node):
        scores = list(c.reward(prompts, completions, **accepted_columns(c.reward.entry.fn, columns)))
        if _is_process(scores):
            part = [[c.weight * float(x) for x in row] for row in scores]
            total = part if total is None else [[a + b for a, b in zip(r, q)] for r, q in zip(total, part)]
        else:
            part1 = [c.weight * float(x) for x in scores]
            total = part1 if total is None else [a + b for a, b in zip(total, part1)]
    return total or []


def _score_combined(
    reward: Resolved,
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]],
    mask: Tensor,
    metrics: dict[str, float] | None,
) -> Tensor:
    total: Tensor | None = None
    kinds: dict[str, bool] = {}
    for c in reward_components(reward):
        scores = score_completions(c.reward, prompts, completions, columns, mask)
        kinds[c.name] = scores.dim() == 2
        if len(set(kinds.values())) > 1:
            raise RlxError(_MIXED.format(", ".join(k for k, p in kinds.items() if p)))
        if metrics is not None:
            seq = scores if scores.dim() == 1 else (scores * mask).sum(-1)
            metrics[f"reward/{c.name}"] = seq.float().mean().item()
        total = c.weight * scores if total is None else total + c.weight * scores
    assert total is not None
    return total


def max_reward_of(reward: Resolved) -> Callable[[Any], float] | None:
    """The reward's maximum for a prompt (``eval/reward_norm``), where it declares one; for a combined
    reward the weighted sum of its components' maxima when every component declares one."""
    if not reward.entry.meta.get("combined"):
        return reward.entry.meta.get("max_reward")
    parts = [(c.weight, c.reward.entry.meta.get("max_reward")) for c in reward_components(reward)]
    if any(fn is None for _, fn in parts):
        return None
    return lambda prompt: sum(w * float(fn(prompt)) for w, fn in parts)  # type: ignore[misc]


def verified_correct(
    reward: Resolved, prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]]
) -> list[bool] | None:
    """Per completion, whether the reward's verifier (a reward registered with ``verifier=True``, such
    as ``reward=math``; for a combined reward, its first such component) accepts it; None when the
    reward has no verifier."""
    combined = reward.entry.meta.get("combined")
    parts = [c.reward for c in reward_components(reward)] if combined else [reward]
    for part in parts:
        if part.entry.meta.get("verifier"):
            scores = part(prompts, completions, **accepted_columns(part.entry.fn, columns))
            return [float(s) >= 1.0 for s in scores]
    return None


def check_reward_columns(node: Mapping[str, Any] | str, task: Any) -> None:
    """Start-up check of a reward against the task's columns: every column a reward function names
    (keyword-only parameter without a default) is one the task provides, and each reward's own
    ``check_task(kwargs, column_names)`` passes (``reward=math``: its ground-truth column exists).
    Tasks that cannot list their columns (the built-in number tasks) are not checked."""
    names_of = getattr(task, "column_names", None)
    if names_of is None:
        return
    available = {*names_of(), "prompt_text", "completion_text"}
    reward = REWARDS.resolve(node, where="reward")
    parts = (
        [(f"reward.components.{c.name}", c.reward) for c in reward_components(reward)]
        if reward.entry.meta.get("combined")
        else [("reward", reward)]
    )
    for where, part in parts:
        params = inspect.signature(part.entry.fn).parameters
        needed = [
            p.name
            for p in params.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
        ]
        missing = [n for n in needed if n not in available]
        if missing:
            raise RlxError(
                f"{where}={part.name} needs the column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)}, which task={getattr(task, 'name', '?')} does not provide "
                f"(it has {sorted(available)})"
            )
        check_task = part.entry.meta.get("check_task")
        if check_task is not None:
            check_task(dict(part.kwargs), sorted(available), where)
