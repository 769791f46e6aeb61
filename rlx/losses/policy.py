"""Policy losses, per token and before aggregation.

Interface: ``loss(logp, old_logp, advantages, mask, *, hparams) -> (per_token_loss, metrics)``.
``logp`` carries the gradient; ``old_logp`` (pi_old, recorded at sampling time) and ``advantages`` are
constants. ``metrics`` are detached, masked scalars. Aggregation to one number is a separate, named
step (`rlx.losses.aggregation`).

``token_local=True`` at registration declares that each token's loss is a function of that token's
``logp`` alone (pg, clipped; not GSPO, whose ratio is a sequence's). Such a loss takes the fused head
(`rlx.models.logprobs.FusedLoss`): its gradient through the LM head is formed in the update's forward,
three matmuls of the head instead of four. A loss registered without it takes the ordinary path.

Erratum in the lecture's ``compute_loss``: its "unclipped" and "clipped" ratios are written as
``log_probs / old_log_probs``; the ratio is ``exp(logp - old_logp)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.masked import masked_mean
from rlx.registry import Registry

POLICY_LOSSES = Registry("policy loss", ["rlx.losses.policy"])


def approx_kl_old(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(pi_old || pi_theta) from tokens sampled by pi_old: (ratio - 1) - log ratio."""
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask).detach()


@POLICY_LOSSES.register("pg", token_local=True)
def policy_gradient_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_t = -A_t * log pi_theta(y_t): REINFORCE (Williams 1992), the lecture's "naive" loss.

    ``old_logp`` is unused by the loss; it only feeds the ``kl/old`` metric.
    """
    log_ratio = (logp - old_logp).detach()
    return -advantages * logp, {"kl/old": approx_kl_old(log_ratio, mask)}


@POLICY_LOSSES.register("clipped", token_local=True)
def clipped_surrogate_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), as used by GRPO (Shao et al. 2024).

    ratio_t = exp(logp_t - old_logp_t);
    L_t = -min(ratio_t * A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t).
    ``eps_high > eps_low`` is DAPO's clip-higher (Yu et al. 2025). ``dual_clip = c`` (Ye et al. 2020)
    bounds the loss of negative-advantage tokens by -c * A_t, c > 1. With one update per batch the
    ratio is 1 and the gradient equals REINFORCE's.
    Metrics: ``clip_frac`` (share of real tokens whose clipped term was the active one) and ``kl/old``.
    """
    if eps_low < 0 or eps_high < 0 or eps_low >= 1:
        raise RlxError(f"clipped loss needs 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise RlxError(f"clipped loss: dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(pg_loss1, pg_loss2)
    if dual_clip is not None:
        pg_loss3 = -advantages * dual_clip
        loss = torch.where(advantages < 0, torch.minimum(loss, pg_loss3), loss)
    metrics = {
        "clip_frac": masked_mean((pg_loss2 > pg_loss1).to(logp.dtype), mask).detach(),
        "kl/old": approx_kl_old(log_ratio.detach(), mask),
    }
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO's sequence-level clipped surrogate (Zheng et al. 2025, "Group Sequence Policy Optimization").

    s_i = exp((1 / |y_i|) sum_t (logp_t - old_logp_t)), the length-normalised sequence ratio;
    L_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), returned on every real token of
    sequence i, so ``seq_mean_token_mean`` aggregation gives the paper's (1 / G) sum_i L_i. The gradient
    is s_i * A_i * mean_t grad(logp_t) where unclipped: GSPO's, not GRPO's per-token one. ``advantages``
    are per token but constant along a sequence for outcome rewards (their masked mean is A_i).
    Metrics: ``clip_frac`` (share of sequences whose clipped term was active) and ``kl/old``.
    Departure: none in the loss; the clip range defaults are the paper's (3e-4, 4e-4).
    """
    if eps_low < 0 or eps_high < 0 or eps_low >= 1:
        raise RlxError(f"gspo loss needs 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    log_ratio = logp - old_logp
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1)  # [N]
    ratio = torch.exp(seq_log_ratio)
    adv = masked_mean(advantages, mask, dim=-1)
    seq_loss1 = -adv * ratio
    seq_loss2 = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    seq_loss = torch.maximum(seq_loss1, seq_loss2)
    has_tokens = (mask.sum(-1) > 0).to(logp.dtype)
    metrics = {
        "clip_frac": ((seq_loss2 > seq_loss1).to(logp.dtype) * has_tokens).sum()
        / has_tokens.sum().clamp(min=1),
        "kl/old": approx_kl_old(log_ratio.detach(), mask),
    }
    return seq_loss.unsqueeze(-1).expand_as(logp), metrics


def importance_sampled_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
    """L_t = -ratio_t * A_t with ratio_t = exp(logp_t - old_logp_t): the unclipped surrogate TRPO
    maximises inside its trust region (Schulman et al. 2015, eq. 14). Not registered as a ``loss``:
    without a trust region it is not safe to take several steps on it."""
    return -advantages * torch.exp(logp - old_logp)
