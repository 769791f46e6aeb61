"""The critic's loss (PPO's value function), per token and before aggregation."""

from __future__ import annotations

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.masked import masked_mean, masked_var


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old - eps_v, V_old + eps_v) - R_t)^2).

    The value clipping of OpenAI's baselines PPO2 and of Ziegler et al. 2019 (``cliprange_value``; not
    in the PPO paper, which regresses (V - R)^2 unclipped: ``clip_range=None`` gives that). ``values``
    carry the gradient; ``old_values`` (the critic at sampling time) and ``returns`` are constants.
    Metrics: ``value/clip_frac``, the share of real tokens where the clipped term was the larger one.
    """
    if clip_range is not None and clip_range <= 0:
        raise RlxError(f"value clip_range must be > 0 or null, got {clip_range}")
    old_values, returns = old_values.detach(), returns.detach()
    vf_loss1 = (values - returns).square()
    if clip_range is None:
        return 0.5 * vf_loss1, {"value/clip_frac": torch.zeros(())}
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    vf_loss2 = (clipped - returns).square()
    metrics = {"value/clip_frac": masked_mean((vf_loss2 > vf_loss1).float(), mask).detach()}
    return 0.5 * torch.maximum(vf_loss1, vf_loss2), metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over real tokens: 1 = perfect critic, 0 = no better than a constant,
    negative = worse (as in OpenAI baselines). NaN when the returns do not vary."""
    var_r = masked_var(returns, mask)
    if var_r.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_r).item()
