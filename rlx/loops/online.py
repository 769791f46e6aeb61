"""The online loop: REINFORCE, RLOO, GRPO, Dr. GRPO, DAPO, REINFORCE++, GSPO, PPO and TRPO are presets
of this one batch path.

    for iteration:
        refresh pi_ref every `kl.ref_refresh` iterations if asked (the lecture), else keep the initial one
        batch = collect()          sample G completions per prompt with pi_old, record old_logp, score;
                                   DAPO's dynamic sampling refills groups whose rewards are all equal
        reference(batch)           ref_logp, when a KL term is on
        critic_values(batch)       V_old, when algo.critic is head | separate
        shape(batch)               token rewards: outcome on the last real token or process per token,
                                   minus beta * KL when the KL is in the reward (`token_rewards`)
        estimate(batch)            advantages from the registry (adv_norm; gae needs the values),
                                   returns = A + V with a critic, optional whitening
        UPDATES[algo.update]       sgd: epochs x minibatches x micro-batches; trpo: CG + line search
        adapt beta                 fixed, or Ziegler et al.'s controller (kl.adaptive_target)
        log; evaluate every `eval_every`; checkpoint every `save_every`

Nothing here branches on an algorithm's name: a preset chooses the estimator, the loss, the KL
placement, the critic and the update rule. The model stays in eval mode (no dropout) throughout, so
old and new log-probs of the same tokens agree.

Where rlx departs from the papers (see each function's docstring too): PPO's KL early stop checks
approx KL(pi_old || pi) before the minibatch's step and skips it (Stable-Baselines3); whitening the
advantages (``algo.whiten_advantages``) is optional for every estimator and off in the ppo preset
(with bounded task rewards it kept PPO oscillating: README, "PPO against GRPO"); rewards are never
whitened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlx import distributed
from rlx.advantages import frac_zero_std_groups, sequence_rewards, token_rewards
from rlx.evaluate import evaluate
from rlx.kl import KLController
from rlx.loops import LOOPS, LoopContext, chunks
from rlx.loops.online_settings import OnlinePlan, plan_online
from rlx.loops.update import UPDATES, Batch, Learner
from rlx.losses.value import explained_variance
from rlx.masked import masked_mean, masked_sum, masked_whiten
from rlx.models import Policy
from rlx.models.value import ActorCriticPolicy, build_critic
from rlx.rewards import score_completions
from rlx.rollout import Rollout, sample_groups
from rlx.rollout.engines import RolloutEngine, build_engine
from rlx.runtime import memory_metrics
from rlx.tracking import LiveProgress


@LOOPS.register("online", plan=plan_online)
def build_online(ctx: LoopContext) -> OnlineTrainer:
    """The policy, its critic when asked, the optimizers, and the loop around them."""
    op: OnlinePlan = ctx.plan.settings
    algo, t = op.algo, ctx.plan.trainer
    policy = ctx.build_policy()
    prepare = UPDATES.get(algo.update).meta.get("prepare")
    if prepare is not None:  # trpo: eager attention (Fisher-vector products differentiate twice)
        prepare(policy)
    critic = build_critic(policy, algo.critic, algo.critic_path) if algo.critic != "none" else None
    distributed.broadcast_module(critic)  # h11: a value head is initialised from each rank's seed
    updates = t.steps * algo.epochs * algo.minibatches
    optimizers: list[tuple[torch.optim.Optimizer, Any]] = []
    if algo.update == "sgd":  # the policy's optimizer (over the value head too when it shares the trunk)
        head = critic.own_parameters() if critic is not None and critic.shared else []
        # the head in a parameter group of its own (same settings, so the same update): under fsdp2
        # the trunk's parameters become DTensors and the head's stay plain tensors, and a fused
        # optimizer step takes one kind per group
        trunk = list(policy.parameters())
        params = [{"params": trunk}, {"params": list(head)}] if head else trunk
        optimizers.append(ctx.make_optimizer(params, updates))
    if critic is not None and not critic.shared:
        optimizer, scheduler = ctx.make_optimizer(critic.own_parameters(), updates)
        if algo.critic_lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] = algo.critic_lr
            scheduler.base_lrs = [algo.critic_lr for _ in scheduler.base_lrs]
        optimizers.append((optimizer, scheduler))
    sampling = ctx.plan.sampling()
    learner = Learner(
        policy=ActorCriticPolicy(policy, critic) if critic is not None else policy,
        critic=critic,
        optimizers=optimizers,
        pieces=op.pieces,
        algo=algo,
        update_settings=op.update_settings,
        guard=ctx.nonfinite,
        micro_batch_size=t.micro_batch_size,
        grad_clip=t.grad_clip,
        temperature=sampling.temperature,
        max_len=algo.max_len or int(sampling.max_new_tokens or 1),
        kl_in_loss=op.pieces.kl is not None and op.kl.placement == "loss" and op.kl.coef > 0,
        seed=t.seed,
    )
    return OnlineTrainer(ctx, learner, build_engine(policy, ctx.plan))  # h11v: rollout.engine


class OnlineTrainer:
    """The loop: stages of one batch, then the update; checkpoint state; evaluation."""

    def __init__(self, ctx: LoopContext, learner: Learner, engine: RolloutEngine | None = None) -> None:
        op: OnlinePlan = ctx.plan.settings
        self.ctx, self.learner = ctx, learner
        self.plan, self.algo, self.kl, self.pieces = ctx.plan, op.algo, op.kl, op.pieces
        self.task, self.tracker, self.sampling = ctx.plan.task, ctx.tracker, ctx.plan.sampling()
        self.policy = learner.policy
        self.critic = learner.critic
        self.update = UPDATES.get(self.algo.update)
        self.rank, self.world_size = distributed.world()
        self.step = 0
        self.kl_ctl = KLController(
            self.kl.coef, target=self.kl.adaptive_target, horizon=self.kl.adaptive_horizon
        )
        self.ref: Policy | None = None
        if self.pieces.kl is not None:
            self.ref = self.policy.frozen_copy(ctx.plan.trainer.reference_torch_dtype)
        self.samples_path = ctx.run_dir / "samples.jsonl"
        self.engine = engine  # h11v: None = the policy samples itself (rollout.engine=hf)

    # the policy's optimizer (what rlx.train saves as "optimizer"), and a separate critic's
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.learner.optimizers[0][0] if self.algo.update == "sgd" else None

    @property
    def scheduler(self) -> Any:
        return self.learner.optimizers[0][1] if self.algo.update == "sgd" else None

    @property
    def _critic_pair(self) -> tuple[torch.optim.Optimizer, Any] | None:
        separate = self.critic is not None and not self.critic.shared
        return self.learner.optimizers[-1] if separate else None

    @property
    def critic_optimizer(self) -> torch.optim.Optimizer | None:
        return self._critic_pair[0] if self._critic_pair else None

    @property
    def critic_scheduler(self) -> Any:
        return self._critic_pair[1] if self._critic_pair else None

    # -- state for checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Beyond the policy/optimizer/scheduler/RNG: step, reference, KL controller, critic."""
        state: dict[str, Any] = {
            "step": self.step,
            "ref": self.ref.model.state_dict() if self.ref is not None else None,
            "nonfinite": self.ctx.nonfinite.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict_for_resume()
        if self._critic_pair is not None:
            state["critic_optimizer"] = self._critic_pair[0].state_dict()
            state["critic_scheduler"] = self._critic_pair[1].state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.ctx.nonfinite.load_state_dict(state["nonfinite"])
        if self.ref is not None and state.get("ref") is not None:
            self.ref.model.load_state_dict(state["ref"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.critic is not None:
            self.critic.load_state_dict_for_resume(state["critic"])
        if self._critic_pair is not None:
            self._critic_pair[0].load_state_dict(state["critic_optimizer"])
            self._critic_pair[1].load_state_dict(state["critic_scheduler"])

    def evaluate(self) -> dict[str, float]:
        # h11: every rank calls it; each generates for its share of the held-out prompts (rlx.evaluate)
        metrics, _ = evaluate(
            self.policy,
            self.task,
            self.pieces.reward,
            self.sampling,
            greedy=self.plan.eval.greedy,
            batch_size=self.plan.eval.batch_size,
        )
        return metrics

    # -- the stages ----------------------------------------------------------------------------
    def _sample_and_score(self, round_: int) -> tuple[Rollout, Tensor]:
        # Extra DAPO rounds draw fresh prompts from a separate stream of the task, indexed by round.
        t = self.plan.trainer
        # h11: prompts_per_step is the global batch; each rank samples its slice of it, whole groups
        prompts = self.task.train_batch(
            self.step, t.prompts_per_step // self.world_size, self.rank, self.world_size, stream=round_
        )
        if self.engine is not None and self.engine.weights_step != self.step:  # h11v: at start, on resume
            self.engine.sync(self.policy, self.step)
        ro = sample_groups(self.policy, prompts, t.group_size, self.sampling, self.engine, t.micro_batch_size)
        self.reward_parts: dict[str, float] = {}  # reward/<component> of reward=combined
        rewards = score_completions(
            self.pieces.reward,
            ro.batch.prompts,
            ro.completions,
            ro.reward_columns(),
            ro.mask,
            self.reward_parts,
        )
        return ro, rewards

    def collect(self) -> Batch:
        """One batch of groups; with DAPO's dynamic sampling, groups whose rewards are all equal are
        dropped and replaced by groups sampled from fresh prompts (up to ``max_resample_rounds``)."""
        group_size = self.plan.trainer.group_size
        ro, rewards = self._sample_and_score(0)
        seq = sequence_rewards(rewards, ro.mask)
        # h11: the logged statistics are of the global batch (every rank's rows gathered)
        all_seq, _ = distributed.gather_rows(seq)
        lengths, _ = distributed.gather_rows(ro.mask.sum(-1).float())
        parts = distributed.all_reduce_dict({k: v * len(seq) for k, v in self.reward_parts.items()})
        metrics = {
            "reward/mean": all_seq.mean().item(),
            "reward/std": all_seq.std().item() if len(all_seq) > 1 else 0.0,
            "frac_reward_zero_std": frac_zero_std_groups(all_seq, group_size),
            "response/length": lengths.mean().item(),
            **{k: v / len(all_seq) for k, v in parts.items()},
        }
        if not self.algo.dynamic_sampling:
            return Batch(ro, rewards, metrics=metrics)
        wanted, have, rounds = ro.num_groups, 0, 0
        kept: list[tuple[Rollout, Tensor]] = []
        # fsdp2 (h11g): a rank whose share is full samples no more, so the ranks run different numbers of
        # forwards (bf16's old log-probs are recomputed by the policy); with the parameters unsharded for
        # all the rounds, none of them is a collective (a no-op unsharded)
        with distributed.FullParameters(self.policy.model):
            rounds, ro, rewards = self._resample(ro, rewards, seq, kept, wanted)
        have = sum(r.num_groups for r, _ in kept)
        metrics["dynamic/rounds"] = float(rounds)
        metrics["dynamic/kept_groups"] = distributed.all_reduce_sum(float(have))
        if not kept:  # nothing informative at all: train on the zero-advantage batch as is
            return Batch(ro, rewards, metrics=metrics)
        return Batch(
            Rollout.concat([r for r, _ in kept]), torch.cat([x for _, x in kept], dim=0), metrics=metrics
        )

    def _resample(
        self, ro: Rollout, rewards: Tensor, seq: Tensor, kept: list[tuple[Rollout, Tensor]], wanted: int
    ) -> tuple[int, Rollout, Tensor]:
        """DAPO's rounds: keep this rank's informative groups (into ``kept``) and sample fresh prompts
        until its share is full or ``max_resample_rounds``. Returns the number of extra rounds run and
        the last round's batch (trained on as is when nothing was kept)."""
        group_size = self.plan.trainer.group_size
        have, rounds = 0, 0
        while True:
            groups = seq.view(-1, group_size)
            informative = (groups.amax(1) != groups.amin(1)).nonzero().flatten().tolist()
            take = informative[: wanted - have]
            if take:
                rows = torch.tensor(
                    [g * group_size + i for g in take for i in range(group_size)], device=rewards.device
                )
                kept.append((ro.select_groups(take), rewards[rows]))
                have += len(take)
            # h11: every rank runs the same number of rounds (while any rank still lacks groups); a rank
            # whose share is full samples no more. Each rank fills its own share from its own prompts.
            if not distributed.agree(have < wanted) or rounds >= self.algo.max_resample_rounds:
                break
            rounds += 1
            if have < wanted:
                ro, rewards = self._sample_and_score(rounds)
                seq = sequence_rewards(rewards, ro.mask)
        return rounds, ro, rewards

    def per_micro_batch(self, ro: Rollout, fn: Callable[..., Tensor]) -> Tensor:
        """``fn(prompt_ids, prompt_mask, tokens, mask)`` ``[n, T]`` for each micro-batch of ``ro``
        (``trainer.micro_batch_size``), as one float ``[N, T]`` tensor, 0 on padding."""
        out = torch.zeros_like(ro.old_logp)
        rows = torch.arange(len(ro.tokens), device=ro.tokens.device)
        for idx in chunks(rows, self.plan.trainer.micro_batch_size):
            args = (ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx])
            out[idx] = fn(*args).float() * ro.mask[idx]
        return out

    @torch.no_grad()
    def reference(self, batch: Batch) -> None:
        """ref_logp under the frozen reference, and the KL to it at sampling time (``kl/ref``)."""
        if self.ref is None or self.pieces.kl is None:
            return
        ro, ref, temperature = batch.rollout, self.ref, self.sampling.temperature
        out = self.per_micro_batch(ro, lambda *args: ref.score(*args, temperature).logp)
        batch.ref_logp = out
        batch.ref_kl = self.pieces.kl(ro.old_logp, out) * ro.mask
        batch.metrics["kl/ref"] = masked_mean(batch.ref_kl, ro.mask).item()

    @torch.no_grad()
    def critic_values(self, batch: Batch) -> None:
        """V_old(s_t) of the critic that goes with pi_old, 0 on padding."""
        if self.critic is None:
            return
        critic, policy = self.critic, self.policy

        def values(*args: Tensor) -> Tensor:
            if critic.shared:
                return critic.values_from_hidden(policy.hidden_states(*args))
            return critic.values(*args)

        # fsdp2 (h11g): the head reads the policy's (sharded) trunk; with the parameters unsharded once, the
        # ranks may run different numbers of micro-batches (DAPO's kept groups) without a collective each
        with distributed.FullParameters(self.policy.model if critic.shared else None):
            batch.values = self.per_micro_batch(batch.rollout, values)

    def shape(self, batch: Batch, beta: float) -> None:
        """Per-token rewards, with -beta * KL on every token when the KL is in the reward."""
        in_reward = batch.ref_kl is not None and self.kl.placement == "reward"
        batch.token_rewards = token_rewards(
            batch.rewards, batch.mask, batch.ref_kl if in_reward else None, beta
        )

    def estimate(self, batch: Batch) -> None:
        """Advantages from the registry (and returns = A + V with a critic), optionally whitened."""
        mask, meta = batch.mask, self.pieces.advantage.entry.meta
        assert batch.token_rewards is not None
        if meta.get("token_rewards") or batch.rewards.dim() == 2:
            rewards = batch.token_rewards
        else:
            rewards = masked_sum(batch.token_rewards, mask, dim=-1)
        # h11: the estimators see the global batch (every rank's rows, gathered in rank order: whole
        # groups, batch_std / reinforce_pp / whitening over all of it); each rank keeps its own rows
        rewards, _ = distributed.gather_rows(rewards)
        mask, mine = distributed.gather_rows(mask)
        values = distributed.gather_rows(batch.values)[0] if batch.values is not None else None
        extra = {"values": values} if "values" in meta.get("needs", ()) else {}
        advantages = self.pieces.advantage(rewards, self.plan.trainer.group_size, mask, **extra)
        batch.metrics["adv/mean"] = masked_mean(advantages, mask).item()
        if values is not None:
            returns = (advantages + values) * mask
            batch.returns = mine.take(returns)
            batch.metrics["value/mean"] = masked_mean(values, mask).item()
            batch.metrics["value/explained_variance"] = explained_variance(values, returns, mask)
        if self.algo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        batch.advantages = mine.take(advantages)

    # -- one iteration -------------------------------------------------------------------------
    def iteration(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.maybe_refresh_reference()
        return self.learn(self.collect(), t0)

    def learn(self, batch: Batch, t0: float | None = None) -> dict[str, float]:
        """Every stage after `collect` on ``batch`` (this rank's rows of the global batch): reference,
        critic values, shaping, advantages, the update, the KL controller; the iteration's metrics."""
        t0 = time.perf_counter() if t0 is None else t0
        self.reference(batch)
        if batch.ref_kl is not None and self.world_size > 1:  # h11: kl/ref of the global batch
            kl = distributed.all_reduce_dict(
                {"kl": masked_sum(batch.ref_kl, batch.mask).item(), "n": batch.mask.sum().item()}
            )
            batch.metrics["kl/ref"] = kl["kl"] / max(kl["n"], 1.0)
        self.critic_values(batch)
        beta = self.kl_ctl.coef
        self.shape(batch, beta)
        self.estimate(batch)
        t1 = time.perf_counter()
        metrics = batch.metrics
        metrics.update(self.update.fn(self.learner, batch, step=self.step, kl_coef=beta))
        if self.engine is not None:  # h11v: the engine samples the next batch with these weights
            self.engine.sync(self.policy, self.step + 1)
        t2 = time.perf_counter()
        if batch.ref_kl is not None:  # the controller measures the mean sequence KL (Ziegler et al.)
            metrics["kl/coef"] = beta
            if self.world_size > 1:  # h11: over the global batch, the same on every rank
                kl = distributed.all_reduce_dict(
                    {"kl": masked_sum(batch.ref_kl, batch.mask, dim=-1).sum().item(), "n": len(batch.mask)}
                )
                self.kl_ctl.update(kl["kl"] / kl["n"], n=int(kl["n"]))
            else:
                self.kl_ctl.update(
                    masked_sum(batch.ref_kl, batch.mask, dim=-1).mean().item(), n=len(batch.mask)
                )
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/update_s"] = t2 - t1
        sampled = distributed.all_reduce_sum(batch.mask.sum().item())  # h11: every rank's tokens
        metrics["throughput/tokens_per_s"] = sampled / max(t2 - t0, 1e-9)  # sampled tokens/s
        if self.plan.trainer.samples_every and self.step % self.plan.trainer.samples_every == 0:
            self._write_samples(batch)
        return metrics

    def maybe_refresh_reference(self) -> None:
        """The lecture re-freezes pi_ref from the current policy every few iterations."""
        if (
            self.ref is not None
            and self.kl.ref_refresh
            and self.step
            and self.step % self.kl.ref_refresh == 0
        ):
            # h11g: under fsdp2 the policy's state is sharded; every rank gathers the whole weights
            self.ref.model.load_state_dict(distributed.whole_state_dict(self.policy.model))

    def _write_samples(self, batch: Batch, groups: int = 2) -> None:
        if self.rank != 0:
            return
        ro, seq = batch.rollout, sequence_rewards(batch.rewards, batch.mask)
        assert batch.advantages is not None
        with self.samples_path.open("a", encoding="utf-8") as f:
            for i in range(min(groups * ro.group_size, len(ro.tokens))):
                row = {
                    "step": self.step + 1,  # numbered like metrics.jsonl: the iteration being logged
                    "prompt": ro.batch.prompts[i],
                    "completion": ro.completions[i],
                    "reward": round(seq[i].item(), 6),
                    "advantage": round(masked_mean(batch.advantages[i], ro.mask[i]).item(), 6),
                }
                f.write(json.dumps(row) + "\n")

    def run(self) -> None:
        t = self.plan.trainer
        with LiveProgress(t.steps, "train", enabled=self.tracker.enabled) as bar:
            while self.step < t.steps:
                metrics = self.iteration()
                self.step += 1
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    metrics.update(self.evaluate())
                metrics.update(memory_metrics(self.plan.device))
                self.tracker.log_metrics(metrics, step=self.step)
                bar.update(self.step, metrics)
                self.ctx.step_done(self)
