"""Reward functions.

Interface: ``reward(prompts, completions, *, <task columns>, <hyperparameters>) -> scores``; scores are
one float per completion (an outcome reward) or one list of floats per completion, one per completion
token (a process reward, registered with ``process=True``). Task columns (``ground_truth``) are
keyword-only parameters without defaults; hyperparameters have defaults and are set from YAML.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.registry import Registry, Resolved

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
    """The task columns ``fn`` takes by name (all of them if it has ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(columns)
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
) -> Tensor:
    """Call a resolved reward on a batch and check what comes back.

    Returns a float32 tensor: ``[N]`` for an outcome reward, ``[N, T]`` (0 on padding) for a process
    reward. A reward that raises, returns the wrong number of scores, or returns NaN/inf stops the run
    with an error that shows the offending prompt and completion.
    """
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
