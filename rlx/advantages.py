"""Advantage estimators ("deltas" in the lecture): rewards -> per-token advantages.

Interface: ``estimator(rewards, group_size, mask, *, hparams) -> advantages [N, T]``.

- ``rewards`` is either one number per completion (outcome reward, shape ``[N]``) or one per completion
  token (process reward, shape ``[N, T]``).
- Rows are grouped prompt-major: rows ``g*G .. g*G + G - 1`` are the G completions of prompt g.
- Outcome advantages are broadcast to every real token of the completion; process rewards use the same
  formula position by position, over the completions of the group that have a real token there.
- The result is zero on masked positions and carries no gradient.

An estimator registered with ``token_rewards=True`` (``gae``, ``reinforce_pp``) is given the per-token
rewards ``[N, T]`` that `token_rewards` builds (the outcome reward on the last real token, a process
reward on its tokens, minus beta x KL on every token when the KL is in the reward); the others get one
number per completion for an outcome reward (the sum of its token rewards) and the per-token rewards
for a process reward. ``needs=("values",)`` (``gae``) makes the loop pass the critic's sampling-time
values as ``values=``: such an estimator needs ``algo.critic=head|separate``, and with a critic the
returns the value loss regresses on are R_t = A_t + V_t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlx.registry import Registry

ADVANTAGES = Registry("advantage estimator", ["rlx.advantages"])


def _grouped(rewards: Tensor, mask: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Reshape to ``[groups, G, T]`` values and mask (outcome rewards become ``T = 1``)."""
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise RlxError(f"batch of {n} completions does not split into groups of {group_size}")
    if rewards.dim() == 1:
        values = rewards.view(-1, group_size, 1)
        valid = torch.ones_like(values)
    else:
        values = rewards.view(-1, group_size, rewards.shape[1])
        valid = mask.view(-1, group_size, mask.shape[1]).to(values.dtype)
    return values, valid


def _to_tokens(adv: Tensor, like: Tensor, mask: Tensor) -> Tensor:
    """``[groups, G, 1 or T]`` -> ``[N, T]``, zero on masked positions, detached."""
    adv = adv.reshape(like.shape[0], -1).expand(-1, mask.shape[1])
    return torch.where(mask.bool(), adv, torch.zeros_like(adv)).detach()


def group_mean(rewards: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """Mean reward of each completion's group (per position for process rewards), ``[groups, 1, T]``."""
    values, valid = _grouped(rewards, mask, group_size)
    return masked_mean(values, valid, dim=1).unsqueeze(1)


def group_std(rewards: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """Unbiased sample std within each group (torch's default), ``[groups, 1, T]``."""
    values, valid = _grouped(rewards, mask, group_size)
    return masked_var(values, valid, dim=1).sqrt().unsqueeze(1)


@ADVANTAGES.register("none")
def raw_reward_advantage(rewards: Tensor, group_size: int, mask: Tensor) -> Tensor:
    """A_i = r_i: naive policy gradient (Williams 1992 REINFORCE without a baseline)."""
    values, _ = _grouped(rewards, mask, group_size)
    return _to_tokens(values, rewards, mask)


@ADVANTAGES.register("center")
def group_centred_advantage(rewards: Tensor, group_size: int, mask: Tensor) -> Tensor:
    """A_i = r_i - mean_group(r): the group mean as baseline (Dr. GRPO, Liu et al. 2025)."""
    values, _ = _grouped(rewards, mask, group_size)
    return _to_tokens(values - group_mean(rewards, mask, group_size), rewards, mask)


@ADVANTAGES.register("group_std", min_group_size=2)
def group_normalised_advantage(
    rewards: Tensor, group_size: int, mask: Tensor, *, eps: float = 1e-6
) -> Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps): GRPO (Shao et al. 2024, DeepSeekMath).

    std is the unbiased sample std. A group whose rewards are all equal gets A = 0.
    """
    values, _ = _grouped(rewards, mask, group_size)
    centred = values - group_mean(rewards, mask, group_size)
    return _to_tokens(centred / (group_std(rewards, mask, group_size) + eps), rewards, mask)


@ADVANTAGES.register("batch_std", min_group_size=2)
def batch_normalised_advantage(
    rewards: Tensor, group_size: int, mask: Tensor, *, eps: float = 1e-6
) -> Tensor:
    """Centre per group, then divide by the std of the centred rewards over the whole batch.

    This is REINFORCE++-baseline (Hu et al. 2025): scale-invariant like GRPO, but the scale comes from
    the whole batch, so it is less noisy for small G and does not blow up low-variance groups.
    Departure: Lite PPO (Liu et al. 2025, "Tricks or Traps") divides by the batch std of the raw
    rewards instead; the two differ by the between-prompt variance.
    """
    values, valid = _grouped(rewards, mask, group_size)
    centred = values - group_mean(rewards, mask, group_size)
    std = masked_var(centred, valid).sqrt()
    return _to_tokens(centred / (std + eps), rewards, mask)


@ADVANTAGES.register("rloo", min_group_size=2)
def leave_one_out_advantage(rewards: Tensor, group_size: int, mask: Tensor) -> Tensor:
    """A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_group(r)): RLOO (Ahmadian et al. 2024).

    For process rewards the count G is the number of completions with a real token at that position.
    """
    values, valid = _grouped(rewards, mask, group_size)
    count = valid.sum(dim=1, keepdim=True)
    scale = count / (count - 1).clamp(min=1)
    centred = values - group_mean(rewards, mask, group_size)
    return _to_tokens(torch.where(count > 1, scale * centred, torch.zeros_like(centred)), rewards, mask)


@ADVANTAGES.register("max")
def group_max_advantage(rewards: Tensor, group_size: int, mask: Tensor) -> Tensor:
    """A_i = r_i where r_i is the group's maximum, else 0 (the lecture's ``max_rewards`` mode).

    All-or-nothing credit, meant to stop a policy settling for partial credit; not from a paper.
    """
    values, valid = _grouped(rewards, mask, group_size)
    neg_inf = torch.full_like(values, float("-inf"))
    best = torch.where(valid.bool(), values, neg_inf).amax(dim=1, keepdim=True)
    return _to_tokens(torch.where(values == best, values, torch.zeros_like(values)), rewards, mask)


def frac_zero_std_groups(sequence_rewards: Tensor, group_size: int) -> float:
    """Share of groups whose (sequence-level) rewards are all equal: their group advantage is 0."""
    groups = sequence_rewards.view(-1, group_size)
    return (groups.amax(1) == groups.amin(1)).float().mean().item()


def token_rewards(
    rewards: Tensor, mask: Tensor, kl_tokens: Tensor | None = None, beta: float = 0.0
) -> Tensor:
    """The one reward-shaping step: ``[N, T]`` per-token rewards, 0 on padding.

    An outcome reward ``[N]`` sits on each completion's last real token (Ziegler et al. 2019), a
    process reward ``[N, T]`` stays on its tokens; with the KL in the reward, r_t <- r_t - beta * kl_t on
    every real token (``kl_tokens`` already masked). Summed over a completion this is r_i - beta * sum_t
    kl_t, the sequence return that group estimators see (as TRL's RLOO folds the KL).
    """
    if rewards.dim() == 2:
        out = rewards * mask
    else:
        out = torch.zeros_like(mask, dtype=torch.float32)
        last = (mask.sum(-1).long() - 1).clamp(min=0)
        out[torch.arange(len(rewards), device=mask.device), last] = rewards.float()
    if kl_tokens is not None and beta:
        out = out - beta * kl_tokens
    return out


def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """One number per completion: the outcome reward, or the sum of a process reward's tokens."""
    return rewards if rewards.dim() == 1 else masked_sum(rewards, mask, dim=-1)


@ADVANTAGES.register("gae", token_rewards=True, needs=("values",))
def generalized_advantage_estimate(
    rewards: Tensor, group_size: int, mask: Tensor, *, values: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> Tensor:
    """Generalised advantage estimation (Schulman et al. 2016), ``[N, T]``.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after the last real token;
    A_t = sum_l (gamma * lambda)^l delta_{t+l}, computed backwards. ``rewards`` are per token (the outcome
    reward on the last real token, the KL penalty on every token); the loop regresses the critic on
    R_t = A_t + V_t. With gamma = lambda = 1, A_t = (sum of the rewards from t on) - V_t (Monte Carlo).
    Groups play no part (``group_size`` is unused). Zero on masked positions, detached.
    """
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise RlxError(f"adv_norm=gae: gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    rewards, values, mask = rewards.detach().float(), values.detach().float(), mask.float()
    n, t_max = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(t_max)):
        # the next state's value and its running advantage count only if token t+1 is real
        next_mask = mask[:, t + 1] if t + 1 < t_max else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < t_max else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * next_mask * last) * mask[:, t]
        advantages[:, t] = last
    return advantages


@ADVANTAGES.register("reinforce_pp", token_rewards=True)
def reinforce_pp_advantage(rewards: Tensor, group_size: int, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu 2025): A_t = sum_{s >= t} gamma^(s-t) r_s, whitened over the whole batch.

    ``rewards`` are per token: the outcome reward on the last real token and -beta * KL_s on every
    token (KL in the reward, as the paper's r(x, y) - beta * sum_{i >= t} KL(i)); the returns are then
    normalised with the batch's masked mean and std (no critic, no group baseline). As OpenRLHF's
    ``reinforce`` estimator; ``group_size`` is unused.
    """
    if not 0 <= gamma <= 1:
        raise RlxError(f"adv_norm=reinforce_pp: gamma must be in [0, 1], got {gamma}")
    rewards, mask = rewards.detach().float(), mask.float()
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return masked_whiten(returns, mask).detach()
