"""Offline losses: preference pairs (DPO, IPO, SPO), reward-model training, and SFT.

A separate registry (`PREFERENCE_LOSSES`) from the online loop's policy losses, so ``conf/loss/*`` is
untouched; the offline presets name their loss in ``algo.loss`` (``algo.loss.beta=0.3``).

Each registered function declares what it consumes with ``inputs=`` (one of `INPUTS`), and the
offline loop picks how to feed it from that declaration alone (`rlx.loops.offline_feeds`):

- ``"completions"``: ``(logp [N, T], mask [N, T]) -> (per_token_loss [N, T], metrics)`` on prompt ->
  completion rows (SFT); aggregation is the separate `rlx.losses.aggregation` step. A loss
  registered ``token_local=True`` (each token's loss a function of that token's log-prob alone, as
  the NLL) takes the fused head (`rlx.models.logprobs.FusedLoss`) on unpacked rows.
- ``"pairs"``: ``(logp_chosen, logp_rejected, ref_chosen, ref_rejected) -> (loss [B], metrics)`` on
  prompt/chosen/rejected rows, each argument a *sequence* log-prob ``[B]`` (the masked sum of
  completion-token log-probs, ALGORITHMS.md "Preference and supervised losses") of the policy or the
  frozen reference.
- ``"scored_pairs"``: as ``"pairs"``, plus the rows' scores as keyword-only data (``score_chosen``,
  ``score_rejected`` ``[B]``).
- ``"reward_pairs"``: ``(reward_chosen, reward_rejected) -> (loss [B], metrics)``: a reward model's
  scalar scores of the two answers (the model being trained is a reward model, not a policy).

Pair losses return one loss per pair; the loop averages them over the whole minibatch (dividing by
the minibatch's pair count, so micro-batches give the unsplit minibatch's gradient). Metrics are
per-pair sums; the loop divides them by the pair count too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.registry import Registry

PREFERENCE_LOSSES = Registry("offline loss", ["rlx.losses.preference"])
# h10o hook: the declared inputs (were token_logp | pair_logp | pair_reward plus a signature sniff)
INPUTS = ("completions", "pairs", "scored_pairs", "reward_pairs")


def _pair_metrics(chosen_reward: Tensor, rejected_reward: Tensor) -> dict[str, Tensor]:
    """Per-pair sums of the DPO-style implicit-reward metrics (the loop divides by the pair count)."""
    margin = chosen_reward - rejected_reward
    return {
        "rewards/chosen": chosen_reward.detach().sum(),
        "rewards/rejected": rejected_reward.detach().sum(),
        "rewards/margin": margin.detach().sum(),
        "rewards/accuracy": (margin.detach() > 0).float().sum(),
    }


@PREFERENCE_LOSSES.register("dpo", inputs="pairs")
def dpo_loss(
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimization (Rafailov et al. 2023), with cDPO's label smoothing.

    z = beta * ((logp_c - ref_c) - (logp_l - ref_l));
    L = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z), eps = ``label_smoothing`` (cDPO, Mitchell
    2023: the preference label is flipped with probability eps). eps = 0 is the paper's loss.
    Implicit rewards beta * (logp - ref_logp) of chosen and rejected, their margin and the share of
    pairs where the chosen one wins are logged (as TRL does).
    """
    if beta <= 0:
        raise ValueError(f"dpo: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_reward = beta * (logp_chosen - ref_chosen)
    rejected_reward = beta * (logp_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, _pair_metrics(chosen_reward, rejected_reward)


@PREFERENCE_LOSSES.register("ipo", inputs="pairs")
def ipo_loss(
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm ...").

    h = (logp_c - ref_c) - (logp_l - ref_l);  L = (h - 1 / (2 * beta))^2.
    ``beta`` is the paper's tau (the regularisation strength): the log-ratio gap is pulled towards
    1 / (2 beta) instead of to infinity. The paper's h uses sequence log-probs (the sum over tokens),
    as here; TRL averages over tokens instead. Seed 002's ``DPOLoss(ipo=True)`` (a margin added to the
    sigmoid loss) is not IPO (ALGORITHMS.md erratum).
    """
    if beta <= 0:
        raise ValueError(f"ipo: beta must be > 0, got {beta}")
    h = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    loss = (h - 1.0 / (2.0 * beta)) ** 2
    return loss, _pair_metrics(beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected))


@PREFERENCE_LOSSES.register("spo", inputs="scored_pairs")
def spo_loss(
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    score_chosen: Tensor,
    score_rejected: Tensor,
    beta: float = 1.0,
    reference: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Score-based preference loss of seed 001 ("SPO"): L = -(s_a - s_b) * beta * (h_a - h_b).

    With ``reference`` (the default) h = logp - ref_logp, the policy-to-reference log-ratio, as in
    DPO; ``reference=false`` gives the seed's form with h = logp. ``beta`` scales the log-ratio gap.
    Real-valued scores s weight each pair by how much better a is than b, so a pair with equal scores
    gives no gradient and a reversed pair (s_a < s_b) pushes the other way.

    Unstable by construction: the loss is linear in the log-ratio gap and unbounded below, so
    minimising it drives logp of the worse completion to -inf; nothing (unlike DPO's sigmoid or IPO's
    square) saturates. Keep the reference term, a small ``beta`` and few epochs (early stopping), and
    watch ``rewards/margin``: it grows without limit when the run diverges.
    """
    if reference:
        h_a, h_b = logp_chosen - ref_chosen, logp_rejected - ref_rejected
    else:
        h_a, h_b = logp_chosen, logp_rejected
    weight = (score_chosen - score_rejected).to(h_a.dtype)
    loss = -weight * beta * (h_a - h_b)
    metrics = _pair_metrics(beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected))
    metrics["score/gap"] = weight.detach().sum()
    return loss, metrics


@PREFERENCE_LOSSES.register("rm_pairwise", inputs="reward_pairs")
def rm_pairwise_loss(
    reward_chosen: Tensor, reward_rejected: Tensor, *, margin: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise (Bradley-Terry) reward-model loss: L = -log sigmoid(r_c - r_l - margin).

    Ouyang et al. 2022 (InstructGPT) and seed 002's ``PairWiseRMLoss``; ``margin`` is Llama 2's
    (Touvron et al. 2023) margin term as one constant rather than a per-pair rating gap. Logged:
    the share of pairs ranked correctly (r_c > r_l) and the mean margin r_c - r_l.
    """
    diff = reward_chosen - reward_rejected
    loss = -F.logsigmoid(diff - margin)
    return loss, {
        "rm/accuracy": (diff.detach() > 0).float().sum(),
        "rm/margin": diff.detach().sum(),
        "rm/chosen": reward_chosen.detach().sum(),
        "rm/rejected": reward_rejected.detach().sum(),
    }


@PREFERENCE_LOSSES.register("sft_nll", inputs="completions", token_local=True)
def sft_nll_loss(logp: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Supervised fine-tuning: the negative log-likelihood of completion tokens only.

    ``mask`` covers the completion (and its EOS) only: prompt tokens and padding never enter the
    loss (TRL's ``completion_only_loss``). Returned per token; the loop aggregates with ``token_mean``
    over the whole minibatch (the mean NLL per completion token, as a causal-LM loss is).
    """
    per_token = torch.where(mask.bool(), -logp, torch.zeros_like(logp))
    return per_token, {}
