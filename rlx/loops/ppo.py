"""``algo=ppo``: PPO with a learned critic (Schulman et al. 2017; for language models Ziegler et al.
2019 and Ouyang et al. 2022), seed 000's flow:

    for iteration:
        sample completions with pi_old = the current policy; old log-probs from sampling
        score -> rewards; V_old(s_t) from the critic; ref log-probs from the frozen reference
        per-token reward r_t = -beta * kl_t (+ the outcome reward on the last real token, or the
        process reward of each token); GAE(gamma, lambda) -> advantages and returns
        for epoch in 1..epochs:                  # no new sampling inside this loop
            for minibatch (micro-batches for memory):
                loss = aggregate(clipped policy loss) - c_ent * aggregate(H) + vf_coef * value loss
                stop here (skip this step and the remaining epochs) if KL(pi_old || pi) > 1.5 x target
                backward, clip grad norm, optimizer step(s)
        adapt beta (fixed, or Ziegler et al.'s proportional controller)

It reuses the online loop's sampling, scoring, reference model, aggregation, evaluation and
progress code (`OnlineTrainer`) and replaces the advantages and the update.

Where rlx departs from the papers:
- The value loss is always a token mean over the minibatch (as TRL and OpenRLHF); the policy loss
  uses ``algo.aggregation`` (token_mean by default).
- The KL early stop checks approx KL(pi_old || pi) (k3 on the minibatch) *before* the minibatch's
  optimizer step and skips that step, as Stable-Baselines3 does; ``early_stop`` logs the epochs done
  (optimizer steps / minibatches, so 1.5 = stopped half-way through the second epoch).
- Whitening the advantages over the whole batch (``algo.whiten_advantages``) is an option, off in
  rlx's preset: TRL and OpenAI's lm-human-preferences whiten by default, but with bounded task
  rewards it rescales the last few errors to unit variance and kept PPO oscillating on the sort task
  (README, "PPO against GRPO"). ``experiment=rlhf_sort`` whitens (a reward model has no fixed scale).
  Rewards are never whitened.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlx.advantages import gae
from rlx.errors import RlxError, require
from rlx.kl import KLController
from rlx.loops import LOOPS, LoopContext
from rlx.loops import chunks as _chunks
from rlx.loops.online import OnlinePlan, OnlineTrainer, plan_online
from rlx.losses.aggregation import token_mean
from rlx.losses.entropy import token_entropy
from rlx.losses.value import clipped_value_loss, explained_variance
from rlx.masked import masked_mean, masked_sum, masked_whiten
from rlx.models import token_logp
from rlx.models.value import ActorCriticPolicy, Critic, build_critic
from rlx.registry import check_type
from rlx.rollout import Rollout
from rlx.tasks import Task

PPO_TYPES: dict[str, Any] = {
    "critic": str,
    "critic_path": str | None,
    "critic_lr": float | None,
    "vf_coef": float,
    "cliprange_value": float | None,
    "gamma": float,
    "lam": float,
    "whiten_advantages": bool,
    "kl_target": float | None,
    "kl_horizon": float,
    "target_kl": float | None,
}


@dataclass
class PPOSettings:
    critic: str
    critic_path: str | None
    critic_lr: float | None
    vf_coef: float
    cliprange_value: float | None
    gamma: float
    lam: float
    whiten_advantages: bool
    kl_target: float | None
    kl_horizon: float
    target_kl: float | None


@dataclass
class PPOPlan(OnlinePlan):
    ppo: PPOSettings


def check_critic_settings(c: dict[str, Any]) -> PPOSettings:
    """The ``algo.*`` keys of the critic and of GAE (shared by ppo and trpo)."""
    a = c["algo"]
    for key, kind in PPO_TYPES.items():
        if key in a:
            check_type(f"algo.{key}", a[key], kind)
    critic = str(a.get("critic") or "none")
    require(
        critic in ("head", "separate", "none"), f"algo.critic must be head, separate or none, got {critic!r}"
    )
    path = a.get("critic_path")
    require(path is None or critic == "separate", "algo.critic_path needs algo.critic=separate")
    require(a.get("vf_coef", 0.1) >= 0, f"algo.vf_coef must be >= 0, got {a.get('vf_coef')}")
    cr = a.get("cliprange_value")
    require(cr is None or cr > 0, f"algo.cliprange_value must be > 0 or null, got {cr}")
    require(0 <= a.get("gamma", 1.0) <= 1, f"algo.gamma must be in [0, 1], got {a.get('gamma')}")
    require(0 <= a.get("lam", 0.95) <= 1, f"algo.lam must be in [0, 1], got {a.get('lam')}")
    lr = a.get("critic_lr")
    require(lr is None or lr > 0, f"algo.critic_lr must be positive or null, got {lr}")
    kt = a.get("kl_target")
    require(kt is None or kt > 0, f"algo.kl_target must be > 0 or null (a fixed coefficient), got {kt}")
    require(a.get("kl_horizon", 10000) > 0, f"algo.kl_horizon must be > 0, got {a.get('kl_horizon')}")
    tk = a.get("target_kl")
    require(tk is None or tk > 0, f"algo.target_kl must be > 0 or null (no early stop), got {tk}")
    return PPOSettings(
        critic=critic,
        critic_path=None if path is None else str(path),
        critic_lr=None if lr is None else float(lr),
        vf_coef=float(a.get("vf_coef", 0.1)),
        cliprange_value=None if cr is None else float(cr),
        gamma=float(a.get("gamma", 1.0)),
        lam=float(a.get("lam", 0.95)),
        whiten_advantages=bool(a.get("whiten_advantages", True)),
        kl_target=None if kt is None else float(kt),
        kl_horizon=float(a.get("kl_horizon", 10000)),
        target_kl=None if tk is None else float(tk),
    )


def plan_ppo(c: dict[str, Any], task: Task) -> PPOPlan:
    """The online loop's checks, then PPO's own: a critic, GAE instead of adv_norm, KL in the reward."""
    op = plan_online(c, task)
    ppo = check_critic_settings(c)
    require(ppo.critic != "none", "algo=ppo needs a critic: algo.critic=head or separate")
    require(
        op.pieces.advantage.name == "none",
        f"algo=ppo computes advantages with GAE (algo.gamma, algo.lam); adv_norm must be none, "
        f"got {op.pieces.advantage.name}",
    )
    require(
        not op.settings.dynamic_sampling, "algo=ppo does not use algo.dynamic_sampling (it needs no groups)"
    )
    if op.pieces.kl is not None:
        require(
            op.settings.kl_placement == "reward",
            "algo=ppo puts the KL penalty in the reward (kl.placement=reward), "
            f"got {op.settings.kl_placement}",
        )
    return PPOPlan(op.settings, op.pieces, ppo)


@LOOPS.register("ppo", plan=plan_ppo)
def build_ppo(ctx: LoopContext) -> PPOTrainer:
    """Policy, critic (head or separate), their optimizers and schedulers."""
    pp: PPOPlan = ctx.plan.settings
    s = pp.settings
    policy = ctx.build_policy()
    critic = build_critic(policy, pp.ppo.critic, pp.ppo.critic_path)
    updates = s.steps * s.epochs * s.minibatches
    critic_optimizer = critic_scheduler = None
    if critic.shared:  # one optimizer over the shared trunk and both heads
        optimizer, scheduler = ctx.make_optimizer([*policy.parameters(), *critic.own_parameters()], updates)
        if pp.ppo.critic_lr is not None:
            raise RlxError("algo.critic_lr needs algo.critic=separate (the head layout has one optimizer)")
    else:
        optimizer, scheduler = ctx.make_optimizer(policy.parameters(), updates)
        critic_optimizer, critic_scheduler = ctx.make_optimizer(critic.own_parameters(), updates)
        if pp.ppo.critic_lr is not None:
            for group in critic_optimizer.param_groups:
                group["lr"] = group["initial_lr"] = pp.ppo.critic_lr
            critic_scheduler.base_lrs = [pp.ppo.critic_lr for _ in critic_scheduler.base_lrs]
    return PPOTrainer(
        ctx=ctx,
        policy=ActorCriticPolicy(policy, critic),
        optimizer=optimizer,
        scheduler=scheduler,
        critic_optimizer=critic_optimizer,
        critic_scheduler=critic_scheduler,
    )


class PPOTrainer(OnlineTrainer):
    """PPO: the online loop's sampling and evaluation, GAE advantages, a critic, KL in the reward."""

    def __init__(
        self,
        *,
        ctx: LoopContext,
        policy: ActorCriticPolicy,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        critic_optimizer: torch.optim.Optimizer | None = None,
        critic_scheduler: Any = None,
    ) -> None:
        super().__init__(ctx=ctx, policy=policy, optimizer=optimizer, scheduler=scheduler)
        pp: PPOPlan = ctx.plan.settings
        self.ppo = pp.ppo
        self.critic: Critic = policy.critic
        self.critic_optimizer = critic_optimizer
        self.critic_scheduler = critic_scheduler
        self.kl_ctl = KLController(self.s.kl_coef, target=self.ppo.kl_target, horizon=self.ppo.kl_horizon)

    # -- state for checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The online state plus the critic (weights, optimizer, scheduler) and the KL controller."""
        state = super().state_dict()
        state["critic"] = self.critic.state_dict_for_resume()
        state["kl_ctl"] = self.kl_ctl.state_dict()
        if self.critic_optimizer is not None:
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
            state["critic_scheduler"] = self.critic_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.critic.load_state_dict_for_resume(state["critic"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])

    # -- values --------------------------------------------------------------------------------
    def _forward(self, ro: Rollout, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Policy logits and critic values for rows ``idx`` (one pass when the trunk is shared)."""
        args = (ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx])
        if self.critic.shared:
            logits, hidden = self.policy.completion_logits_and_hidden(*args)
            return logits, self.critic.values_from_hidden(hidden)
        return self.policy.completion_logits(*args), self.critic.values(*args)

    @torch.no_grad()
    def sampling_values(self, ro: Rollout) -> Tensor:
        """V_old(s_t) of the critic that goes with pi_old, 0 on padding."""
        out = torch.zeros_like(ro.old_logp)
        for idx in _chunks(torch.arange(len(ro.tokens), device=ro.tokens.device), self.s.micro_batch_size):
            args = (ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx])
            if self.critic.shared:
                _, hidden = self.policy.completion_logits_and_hidden(*args)
                values = self.critic.values_from_hidden(hidden)
            else:
                values = self.critic.values(*args)
            out[idx] = values.float() * ro.mask[idx]
        return out

    # -- one iteration -------------------------------------------------------------------------
    def iteration(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.maybe_refresh_reference()
        ro, rewards, metrics = self.collect()
        mask = ro.mask
        token_rewards = token_level_rewards(rewards, mask)
        beta = self.kl_ctl.coef
        seq_kl = 0.0
        if self.ref is not None and self.p.kl is not None:
            ref_logp = self.reference_logp(ro)
            kl_tokens = self.p.kl(ro.old_logp, ref_logp) * mask
            metrics["kl/ref"] = masked_mean(kl_tokens, mask).item()
            seq_kl = masked_sum(kl_tokens, mask, dim=-1).mean().item()
            token_rewards = token_rewards - beta * kl_tokens
        old_values = self.sampling_values(ro)
        advantages, returns = gae(token_rewards, old_values, mask, gamma=self.ppo.gamma, lam=self.ppo.lam)
        metrics["adv/mean"] = masked_mean(advantages, mask).item()
        metrics["value/mean"] = masked_mean(old_values, mask).item()
        metrics["value/explained_variance"] = explained_variance(old_values, returns, mask)
        metrics["kl/coef"] = beta
        if self.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        t1 = time.perf_counter()
        metrics.update(self.update_actor_critic(ro, advantages, old_values, returns))
        t2 = time.perf_counter()
        self.kl_ctl.update(seq_kl, n=len(ro.tokens))
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/update_s"] = t2 - t1
        metrics["throughput/tokens_per_s"] = mask.sum().item() / max(t2 - t0, 1e-9)
        if self.s.samples_every and self.step % self.s.samples_every == 0:
            self._write_samples(ro, rewards, advantages)
        return metrics

    # -- the update ----------------------------------------------------------------------------
    def update_actor_critic(
        self, ro: Rollout, advantages: Tensor, old_values: Tensor, returns: Tensor
    ) -> dict[str, float]:
        n = len(ro.tokens)
        mb_size = n // self.s.minibatches
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        temperature = self.s.sampling.temperature
        steps_done = 0
        stopped = False
        for _epoch in range(self.s.epochs):
            device = ro.tokens.device
            perm = (
                torch.randperm(n, device=device) if self.s.minibatches > 1 else torch.arange(n, device=device)
            )
            for mb in range(self.s.minibatches):
                rows = perm[mb * mb_size : (mb + 1) * mb_size]
                num_tokens = ro.mask[rows].sum().item()
                num_seqs = len(rows)
                self._zero_grad()
                m: dict[str, float] = defaultdict(float)
                skipped = False
                for idx in _chunks(rows, self.s.micro_batch_size):
                    share = len(idx) / num_seqs
                    mask = ro.mask[idx]
                    logits, values = self._forward(ro, idx)
                    logp = token_logp(logits, ro.tokens[idx], temperature)
                    per_token, loss_metrics = self.p.policy_loss(
                        logp, ro.old_logp[idx], advantages[idx], mask
                    )
                    agg = self._aggregate_fn(num_tokens, num_seqs)
                    policy_loss = agg(per_token, mask)
                    value_tokens, value_metrics = clipped_value_loss(
                        values, old_values[idx], returns[idx], mask, clip_range=self.ppo.cliprange_value
                    )
                    value_loss = token_mean(value_tokens, mask, num_tokens, num_seqs)
                    total = policy_loss + self.ppo.vf_coef * value_loss
                    if self.s.entropy_coef:
                        entropy = token_entropy(logits / temperature)
                        total = total - self.s.entropy_coef * agg(entropy, mask)
                    else:
                        with torch.no_grad():
                            entropy = token_entropy(logits / temperature)
                    what = f"loss (policy loss {policy_loss.item()}, value loss {value_loss.item()})"
                    if not self.ctx.nonfinite.ok(total, what, self.step):
                        skipped = True
                        break
                    total.backward()
                    m["loss/total"] += total.item()
                    m["loss/policy"] += policy_loss.item()
                    m["loss/value"] += value_loss.item()
                    m["entropy"] += share * masked_mean(entropy.detach(), mask).item()
                    for k, v in {**loss_metrics, **value_metrics}.items():
                        m[k] += share * float(v)
                if skipped:  # trainer.on_nonfinite=skip: this update is dropped
                    self._zero_grad()
                    continue
                # KL early stop: this minibatch measured how far the previous steps moved pi from pi_old
                if self.ppo.target_kl is not None and m["kl/old"] > 1.5 * self.ppo.target_kl:
                    self._zero_grad()
                    sums["kl/old"] += m["kl/old"]
                    counts["kl/old"] += 1
                    stopped = True
                    break
                grad_norm = self._step_optimizers()
                if grad_norm is None:
                    continue
                m["grad_norm"] = grad_norm
                m["lr"] = self.optimizer.param_groups[0]["lr"]
                steps_done += 1
                for k, v in m.items():
                    sums[k] += v
                    counts[k] += 1
            if stopped:
                break
        out = {k: sums[k] / counts[k] for k in sums}
        out["early_stop"] = steps_done / self.s.minibatches
        out["nonfinite/skipped"] = float(self.ctx.nonfinite.skipped)
        return out

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)

    def _step_optimizers(self) -> float | None:
        """Clip and step the policy's optimizer (and the separate critic's); the policy's grad norm.

        Both norms are checked before either optimizer steps, so a dropped update
        (``trainer.on_nonfinite=skip``, returning None) touches neither model."""
        max_norm = self.s.grad_clip if self.s.grad_clip else float("inf")
        params = [p for p in self.optimizer_params() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        critic_norm = 0.0
        if self.critic_optimizer is not None:
            critic_params = [p for p in self.critic.own_parameters() if p.grad is not None]
            critic_norm = float(torch.nn.utils.clip_grad_norm_(critic_params, max_norm))
        guard = self.ctx.nonfinite
        if not (
            guard.ok(grad_norm, "gradient norm", self.step)
            and guard.ok(critic_norm, "critic gradient norm", self.step)
        ):
            self._zero_grad()
            return None
        guard.update_done()
        self.optimizer.step()
        self.scheduler.step()
        if self.critic_optimizer is not None:
            self.critic_optimizer.step()
            self.critic_scheduler.step()
        return grad_norm

    def optimizer_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def token_level_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """``[N, T]`` rewards for GAE: an outcome reward on each completion's last real token (Ziegler et
    al. 2019), a process reward where it is (0 on padding)."""
    if rewards.dim() == 2:
        return rewards * mask
    out = torch.zeros_like(mask, dtype=torch.float32)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    out[torch.arange(len(rewards), device=mask.device), last] = rewards.float()
    return out
