"""Loss aggregation: how per-token losses ``[N, T]`` become one number.

Interface: ``aggregate(per_token, mask, num_tokens=None, num_seqs=None, *, max_len=None) -> scalar``.
``max_len`` is the one hyperparameter (Dr. GRPO's T_max); the counts are data.

``num_tokens`` and ``num_seqs`` are the counts of the whole *minibatch* (one optimizer step), not of
the micro-batch being processed, so that summing the aggregated losses of the micro-batches gives
exactly the loss of the unsplit minibatch (gradient accumulation without a silent renormalisation).
When called on a whole minibatch they default to its own counts.

- ``token_mean``: sum_{i,t} L m / sum_{i,t} m (DAPO, Yu et al. 2025; verl's default).
- ``seq_mean_token_mean``: mean over sequences of each sequence's token mean (GRPO paper).
- ``seq_mean_token_sum``: mean over sequences of each sequence's token sum.
- ``seq_mean_token_sum_norm``: sum_{i,t} L m / (num_seqs * T_max), T_max a constant (Dr. GRPO,
  Liu et al. 2025); rlx takes T_max = the generation budget ``max_new_tokens`` unless set.

Each is registered ``linear=True``: linear in ``per_token``, its weights a function of the mask and the
counts only, which the fused head (`rlx.models.logprobs.FusedLoss`) needs.
"""

from __future__ import annotations

from torch import Tensor

from rlx.masked import masked_sum
from rlx.registry import Registry

AGGREGATIONS = Registry("loss aggregation", ["rlx.losses.aggregation"])


def _counts(mask: Tensor, num_tokens: float | None, num_seqs: int | None) -> tuple[float, int]:
    tokens = float(mask.sum().item()) if num_tokens is None else float(num_tokens)
    seqs = int(mask.shape[0]) if num_seqs is None else int(num_seqs)
    return max(tokens, 1.0), max(seqs, 1)


@AGGREGATIONS.register("token_mean", linear=True)
def token_mean(
    per_token: Tensor,
    mask: Tensor,
    num_tokens: float | None = None,
    num_seqs: int | None = None,
    *,
    max_len: int | None = None,
) -> Tensor:
    """Mean over every real token of the minibatch."""
    tokens, _ = _counts(mask, num_tokens, num_seqs)
    return masked_sum(per_token, mask) / tokens


@AGGREGATIONS.register("seq_mean_token_mean", linear=True)
def seq_mean_token_mean(
    per_token: Tensor,
    mask: Tensor,
    num_tokens: float | None = None,
    num_seqs: int | None = None,
    *,
    max_len: int | None = None,
) -> Tensor:
    """Mean over sequences of each sequence's mean over its real tokens."""
    _, seqs = _counts(mask, num_tokens, num_seqs)
    per_seq = masked_sum(per_token, mask, dim=-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / seqs


@AGGREGATIONS.register("seq_mean_token_sum", linear=True)
def seq_mean_token_sum(
    per_token: Tensor,
    mask: Tensor,
    num_tokens: float | None = None,
    num_seqs: int | None = None,
    *,
    max_len: int | None = None,
) -> Tensor:
    """Mean over sequences of each sequence's sum over its real tokens."""
    _, seqs = _counts(mask, num_tokens, num_seqs)
    return masked_sum(per_token, mask) / seqs


@AGGREGATIONS.register("seq_mean_token_sum_norm", linear=True)
def seq_mean_token_sum_norm(
    per_token: Tensor,
    mask: Tensor,
    num_tokens: float | None = None,
    num_seqs: int | None = None,
    *,
    max_len: int | None = None,
) -> Tensor:
    """sum_{i,t} L m / (num_seqs * T_max): Dr. GRPO's length-unbiased constant normaliser."""
    _, seqs = _counts(mask, num_tokens, num_seqs)
    t_max = per_token.shape[-1] if max_len is None else max_len
    return masked_sum(per_token, mask) / (seqs * t_max)
