"""The online loop: REINFORCE, RLOO, GRPO, Dr. GRPO and DAPO are presets of this one loop.

    for iteration:
        refresh pi_ref every `ref_refresh` iterations if asked (the lecture), else keep the initial one
        sample G completions per prompt with pi_old = the current policy; record old_logp
        score -> rewards; (KL in the reward) shape them; advantages per group
        for epoch in 1..epochs:                 # no new sampling inside this loop
            for minibatch (split into micro-batches for memory):
                logp, entropy under the current policy
                loss = aggregate(policy loss) + beta * aggregate(KL) (in the loss) - c_ent * aggregate(H)
                backward (accumulate), clip grad norm, optimizer step
        log metrics; evaluate every `eval_every`; checkpoint every `save_every`

Gradient accumulation gives the update of the unsplit minibatch: every micro-batch's loss is
normalised by the minibatch's token and sequence counts (`rlx.losses.aggregation`). The model stays
in eval mode (no dropout) throughout, so old and new log-probs of the same tokens agree.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlx.advantages import ADVANTAGES, frac_zero_std_groups
from rlx.errors import require
from rlx.evaluate import evaluate
from rlx.kl import KL_ESTIMATORS
from rlx.loops import LOOPS, LoopContext
from rlx.loops import chunks as _chunks
from rlx.losses.aggregation import AGGREGATIONS
from rlx.losses.entropy import token_entropy
from rlx.losses.policy import POLICY_LOSSES
from rlx.masked import masked_mean, masked_sum
from rlx.models import Policy, Sampling, token_logp
from rlx.registry import Resolved, check_type
from rlx.rewards import REWARDS, load_callable, score_completions
from rlx.rollout import Rollout, sample_groups
from rlx.runtime import dist_rank
from rlx.tasks import Task
from rlx.tracking import LiveProgress, Tracker


@dataclass
class OnlineSettings:
    """Everything the loop needs from the config, resolved and checked (see `rlx.train.plan`)."""

    steps: int
    prompts_per_step: int
    group_size: int
    epochs: int
    minibatches: int
    micro_batch_size: int | None
    grad_clip: float | None
    entropy_coef: float
    max_len: int | None
    dynamic_sampling: bool
    max_resample_rounds: int
    kl_coef: float
    kl_placement: str  # "loss" | "reward"
    ref_refresh: int
    eval_every: int
    samples_every: int
    eval_greedy: bool
    eval_batch_size: int
    sampling: Sampling


@dataclass
class Pieces:
    """The pluggable math, bound to its hyperparameters."""

    reward: Resolved
    advantage: Resolved
    policy_loss: Resolved
    aggregation: Resolved
    kl: Resolved | None


@dataclass
class OnlinePlan:
    settings: OnlineSettings
    pieces: Pieces


ALGO_TYPES: dict[str, Any] = {
    "name": str,
    "loop": str,
    "aggregation": str,
    "max_len": int | None,
    "entropy_coef": float,
    "epochs": int,
    "minibatches": int,
    "dynamic_sampling": bool,
    "max_resample_rounds": int,
}
KL_LOOP_KEYS = {"coef": 0.0, "placement": "loss", "ref_refresh": 0}


def plan_online(c: dict[str, Any], task: Task) -> OnlinePlan:
    """Check the online loop's settings and bind its pieces (reward, advantages, loss, KL)."""
    t, a, r = c["trainer"], c["algo"], c["rollout"]
    for key, kind in ALGO_TYPES.items():
        if key in a:
            check_type(f"algo.{key}", a[key], kind)
    require(t["prompts_per_step"] >= 1, f"trainer.prompts_per_step must be >= 1, got {t['prompts_per_step']}")
    require(t["group_size"] >= 1, f"trainer.group_size must be >= 1, got {t['group_size']}")
    require(a["epochs"] >= 1, f"algo.epochs must be >= 1, got {a['epochs']}")
    require(a["minibatches"] >= 1, f"algo.minibatches must be >= 1, got {a['minibatches']}")
    n = t["prompts_per_step"] * t["group_size"]
    require(
        n % a["minibatches"] == 0,
        f"{n} completions per step (trainer.prompts_per_step x trainer.group_size) do not split into "
        f"algo.minibatches={a['minibatches']}",
    )
    mbs = t["micro_batch_size"]
    require(mbs is None or mbs >= 1, f"trainer.micro_batch_size must be >= 1 or null, got {mbs}")
    require(r["temperature"] > 0, f"rollout.temperature must be > 0, got {r['temperature']}")
    require(r["top_k"] >= 0, f"rollout.top_k must be >= 0 (0 = off), got {r['top_k']}")
    require(0 < r["top_p"] <= 1, f"rollout.top_p must be in (0, 1], got {r['top_p']}")
    require(a["entropy_coef"] >= 0, f"algo.entropy_coef must be >= 0, got {a['entropy_coef']}")
    max_new = r["max_new_tokens"] or task.max_new_tokens
    require(max_new >= 1, f"rollout.max_new_tokens must be >= 1, got {max_new}")

    reward = REWARDS.resolve(c["reward"], where="reward")
    if reward.name == "custom":
        fn = reward.kwargs.get("fn")
        require(fn not in (None, "", "???"), "reward=custom needs reward.fn=my_module:my_reward")
        load_callable(str(fn), where="reward.fn")
    check = reward.entry.meta.get("check")  # a reward's own start-up check (reward=model loads its model)
    if check is not None:
        check(dict(reward.kwargs))
    advantage = ADVANTAGES.resolve(c["adv_norm"], where="adv_norm")
    min_group = advantage.entry.meta.get("min_group_size", 1)
    require(
        t["group_size"] >= min_group,
        f"adv_norm={advantage.name} needs trainer.group_size >= {min_group}, got {t['group_size']} "
        "(a group of one has no spread to normalise by)",
    )
    if a["dynamic_sampling"]:
        require(t["group_size"] >= 2, "algo.dynamic_sampling needs trainer.group_size >= 2")
    policy_loss = POLICY_LOSSES.resolve(c["loss"], where="loss")
    x = torch.zeros(1, 2)  # one call on a tiny batch: bad hyperparameter values fail here
    policy_loss(x, x, torch.ones(1, 2), torch.ones(1, 2))
    aggregation = AGGREGATIONS.resolve(str(a["aggregation"]), where="algo.aggregation")
    kl = resolve_kl(c["kl"])
    settings = OnlineSettings(
        steps=int(t["steps"]),
        prompts_per_step=int(t["prompts_per_step"]),
        group_size=int(t["group_size"]),
        epochs=int(a["epochs"]),
        minibatches=int(a["minibatches"]),
        micro_batch_size=mbs,
        grad_clip=t["grad_clip"],
        entropy_coef=float(a["entropy_coef"]),
        max_len=a.get("max_len"),
        dynamic_sampling=bool(a["dynamic_sampling"]),
        max_resample_rounds=int(a.get("max_resample_rounds") or 0),
        kl_coef=float(kl.extra["coef"]) if kl else 0.0,
        kl_placement=str(kl.extra["placement"]) if kl else "loss",
        ref_refresh=int(kl.extra["ref_refresh"] or 0) if kl else 0,
        eval_every=int(t["eval_every"] or 0),
        samples_every=int(t["samples_every"] or 0),
        eval_greedy=bool(c["eval"]["greedy"]),
        eval_batch_size=int(c["eval"]["batch_size"]),
        sampling=Sampling(
            temperature=float(r["temperature"]),
            top_k=int(r["top_k"]),
            top_p=float(r["top_p"]),
            max_new_tokens=int(max_new),
        ),
    )
    pieces = Pieces(
        reward=reward, advantage=advantage, policy_loss=policy_loss, aggregation=aggregation, kl=kl
    )
    return OnlinePlan(settings, pieces)


def resolve_kl(node: dict[str, Any]) -> Resolved | None:
    """The ``kl`` group: None for ``kl=none``, else the estimator with coef/placement/ref_refresh."""
    if node.get("name") in (None, "none"):
        return None
    kl = KL_ESTIMATORS.resolve(node, where="kl", reserved=KL_LOOP_KEYS)
    placement = kl.extra["placement"]
    require(placement in ("loss", "reward"), f"kl.placement must be loss or reward, got {placement!r}")
    require(float(kl.extra["coef"]) >= 0, f"kl.coef must be >= 0, got {kl.extra['coef']}")
    require(int(kl.extra["ref_refresh"] or 0) >= 0, "kl.ref_refresh must be >= 0")
    return kl


@LOOPS.register("online", plan=plan_online)
def build_online(ctx: LoopContext) -> OnlineTrainer:
    """The policy, optimizer and scheduler for the online loop."""
    op: OnlinePlan = ctx.plan.settings
    s = op.settings
    policy = ctx.build_policy()
    optimizer, scheduler = ctx.make_optimizer(policy.parameters(), s.steps * s.epochs * s.minibatches)
    return OnlineTrainer(ctx=ctx, policy=policy, optimizer=optimizer, scheduler=scheduler)


class OnlineTrainer:
    """REINFORCE / RLOO / GRPO / Dr. GRPO / DAPO: sample, score, advantages, epochs of updates."""

    def __init__(
        self,
        *,
        ctx: LoopContext,
        policy: Policy,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        op: OnlinePlan = ctx.plan.settings
        self.ctx = ctx
        self.s = op.settings
        self.p = op.pieces
        self.task = ctx.plan.task
        self.policy = policy
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.tracker: Tracker = ctx.tracker
        self.run_dir: Path = ctx.run_dir
        self.rank, self.world_size = dist_rank()
        self.step = 0
        self.ref: Policy | None = None
        if self.p.kl is not None:
            self.ref = copy.copy(policy)
            self.ref.model = copy.deepcopy(policy.model).requires_grad_(False)
        self.samples_path = self.run_dir / "samples.jsonl"

    # -- state for checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Beyond the policy/optimizer/scheduler/RNG: the step and the reference model."""
        return {
            "step": self.step,
            "ref": self.ref.model.state_dict() if self.ref is not None else None,
            "nonfinite": self.ctx.nonfinite.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.ctx.nonfinite.load_state_dict(state["nonfinite"])
        if self.ref is not None and state.get("ref") is not None:
            self.ref.model.load_state_dict(state["ref"])

    def evaluate(self) -> dict[str, float]:
        metrics, _ = evaluate(
            self.policy,
            self.task,
            self.p.reward,
            self.s.sampling,
            greedy=self.s.eval_greedy,
            batch_size=self.s.eval_batch_size,
        )
        return metrics

    # -- the reference model -------------------------------------------------------------------
    def maybe_refresh_reference(self) -> None:
        """The lecture re-freezes pi_ref from the current policy every few iterations."""
        if self.ref is not None and self.s.ref_refresh and self.step and self.step % self.s.ref_refresh == 0:
            self.ref.model.load_state_dict(self.policy.model.state_dict())

    @torch.no_grad()
    def reference_logp(self, ro: Rollout) -> Tensor:
        assert self.ref is not None
        out = torch.zeros_like(ro.old_logp)
        for idx in _chunks(torch.arange(len(ro.tokens), device=ro.tokens.device), self.s.micro_batch_size):
            logits = self.ref.completion_logits(
                ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx]
            )
            out[idx] = token_logp(logits, ro.tokens[idx], self.s.sampling.temperature) * ro.mask[idx]
        return out

    # -- rollout and rewards -------------------------------------------------------------------
    def _sample_and_score(self, round_: int) -> tuple[Rollout, Tensor]:
        # Extra DAPO rounds draw fresh prompts from a separate stream of the task, indexed by round.
        prompts = self.task.train_batch(
            self.step, self.s.prompts_per_step, self.rank, self.world_size, stream=round_
        )
        ro = sample_groups(self.policy, prompts, self.s.group_size, self.s.sampling)
        self.reward_parts: dict[str, float] = {}  # h15 hook: reward/<component> of reward=combined
        rewards = score_completions(
            self.p.reward, ro.batch.prompts, ro.completions, ro.reward_columns(), ro.mask, self.reward_parts
        )
        return ro, rewards

    def collect(self) -> tuple[Rollout, Tensor, dict[str, float]]:
        """One batch of groups; with DAPO's dynamic sampling, groups whose rewards are all equal are
        dropped and replaced by groups sampled from fresh prompts (up to ``max_resample_rounds``)."""
        ro, rewards = self._sample_and_score(0)
        seq = _sequence_rewards(rewards, ro.mask)
        metrics = {
            "reward/mean": seq.mean().item(),
            "reward/std": seq.std().item() if len(seq) > 1 else 0.0,
            "frac_reward_zero_std": frac_zero_std_groups(seq, self.s.group_size),
            "response/length": ro.mask.sum(-1).mean().item(),
            **self.reward_parts,  # h15 hook
        }
        if not self.s.dynamic_sampling:
            return ro, rewards, metrics
        wanted = ro.num_groups
        kept_ro: list[Rollout] = []
        kept_r: list[Tensor] = []
        have = 0
        rounds = 0
        while True:
            groups = seq.view(-1, self.s.group_size)
            informative = (groups.amax(1) != groups.amin(1)).nonzero().flatten().tolist()
            take = informative[: wanted - have]
            if take:
                kept_ro.append(ro.select_groups(take))
                kept_r.append(_select_group_rows(rewards, take, self.s.group_size))
                have += len(take)
            if have >= wanted or rounds >= self.s.max_resample_rounds:
                break
            rounds += 1
            ro, rewards = self._sample_and_score(rounds)
            seq = _sequence_rewards(rewards, ro.mask)
        metrics["dynamic/rounds"] = float(rounds)
        metrics["dynamic/kept_groups"] = float(have)
        if not kept_ro:  # nothing informative at all: train on the zero-advantage batch as is
            return ro, rewards, metrics
        return Rollout.concat(kept_ro), _cat_rewards(kept_r), metrics

    # -- the update ----------------------------------------------------------------------------
    def update(self, ro: Rollout, advantages: Tensor, ref_logp: Tensor | None) -> dict[str, float]:
        n = len(ro.tokens)
        mb_size = n // self.s.minibatches
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        temperature = self.s.sampling.temperature
        kl_in_loss = self.p.kl is not None and self.s.kl_placement == "loss" and self.s.kl_coef > 0
        for _epoch in range(self.s.epochs):
            device = ro.tokens.device
            perm = (
                torch.randperm(n, device=device) if self.s.minibatches > 1 else torch.arange(n, device=device)
            )
            for mb in range(self.s.minibatches):
                rows = perm[mb * mb_size : (mb + 1) * mb_size]
                num_tokens = ro.mask[rows].sum().item()
                num_seqs = len(rows)
                self.optimizer.zero_grad(set_to_none=True)
                step_metrics: dict[str, float] = defaultdict(float)
                skipped = False
                for idx in _chunks(rows, self.s.micro_batch_size):
                    share = len(idx) / num_seqs
                    mask = ro.mask[idx]
                    logits = self.policy.completion_logits(
                        ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], mask
                    )
                    logp = token_logp(logits, ro.tokens[idx], temperature)
                    per_token, loss_metrics = self.p.policy_loss(
                        logp, ro.old_logp[idx], advantages[idx], mask
                    )
                    agg = self._aggregate_fn(num_tokens, num_seqs)
                    policy_loss = agg(per_token, mask)
                    total = policy_loss
                    if self.s.entropy_coef:
                        entropy = token_entropy(logits / temperature)
                        total = total - self.s.entropy_coef * agg(entropy, mask)
                    else:
                        with torch.no_grad():
                            entropy = token_entropy(logits / temperature)
                    if kl_in_loss:
                        assert ref_logp is not None and self.p.kl is not None
                        kl_tokens = self.p.kl(logp, ref_logp[idx])
                        kl_loss = agg(kl_tokens, mask)
                        total = total + self.s.kl_coef * kl_loss
                        step_metrics["loss/kl"] += kl_loss.item()
                    what = f"loss (policy loss {policy_loss.item()})"
                    if not self.ctx.nonfinite.ok(total, what, self.step):
                        skipped = True
                        break
                    total.backward()
                    step_metrics["loss/total"] += total.item()
                    step_metrics["loss/policy"] += policy_loss.item()
                    step_metrics["entropy"] += share * masked_mean(entropy.detach(), mask).item()
                    for k, v in loss_metrics.items():
                        step_metrics[k] += share * float(v)
                grad_norm = float("nan") if skipped else self._clip_gradients()
                if skipped or not self.ctx.nonfinite.ok(grad_norm, "gradient norm", self.step):
                    self.optimizer.zero_grad(set_to_none=True)  # this update is dropped (on_nonfinite=skip)
                    continue
                self.ctx.nonfinite.update_done()
                step_metrics["grad_norm"] = grad_norm
                step_metrics["lr"] = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                for k, v in step_metrics.items():
                    sums[k] += v
                    counts[k] += 1
        out = {k: sums[k] / counts[k] for k in sums}
        out["nonfinite/skipped"] = float(self.ctx.nonfinite.skipped)
        return out

    def _aggregate_fn(self, num_tokens: float, num_seqs: int) -> Callable[[Tensor, Tensor], Tensor]:
        agg, max_len = self.p.aggregation, self.s.max_len or self.s.sampling.max_new_tokens
        return lambda x, mask: agg(x, mask, num_tokens, num_seqs, max_len=max_len)

    def _clip_gradients(self) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.s.grad_clip if self.s.grad_clip else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # -- one iteration -------------------------------------------------------------------------
    def iteration(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.maybe_refresh_reference()
        ro, rewards, metrics = self.collect()
        ref_logp = self.reference_logp(ro) if self.ref is not None else None
        shaped = rewards
        if ref_logp is not None and self.p.kl is not None:
            kl_tokens = self.p.kl(ro.old_logp, ref_logp) * ro.mask
            metrics["kl/ref"] = masked_mean(kl_tokens, ro.mask).item()
            if self.s.kl_placement == "reward" and self.s.kl_coef > 0:
                shaped = _kl_shaped_rewards(rewards, kl_tokens, ro.mask, self.s.kl_coef)
        advantages = self.p.advantage(shaped, self.s.group_size, ro.mask)
        metrics["adv/mean"] = masked_mean(advantages, ro.mask).item()
        t1 = time.perf_counter()
        metrics.update(self.update(ro, advantages, ref_logp))
        t2 = time.perf_counter()
        tokens = ro.mask.sum().item()
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/update_s"] = t2 - t1
        metrics["throughput/tokens_per_s"] = tokens / max(t2 - t0, 1e-9)  # sampled tokens per second
        if self.s.samples_every and self.step % self.s.samples_every == 0:
            self._write_samples(ro, rewards, advantages)
        return metrics

    def _write_samples(self, ro: Rollout, rewards: Tensor, advantages: Tensor, groups: int = 2) -> None:
        if self.rank != 0:
            return
        seq = _sequence_rewards(rewards, ro.mask)
        with self.samples_path.open("a", encoding="utf-8") as f:
            for i in range(min(groups * ro.group_size, len(ro.tokens))):
                row = {
                    "step": self.step + 1,  # numbered like metrics.jsonl: the iteration being logged
                    "prompt": ro.batch.prompts[i],
                    "completion": ro.completions[i],
                    "reward": round(seq[i].item(), 6),
                    "advantage": round(masked_mean(advantages[i], ro.mask[i]).item(), 6),
                }
                f.write(json.dumps(row) + "\n")

    def run(self) -> None:
        with LiveProgress(self.s.steps, "train", enabled=self.tracker.enabled) as bar:
            while self.step < self.s.steps:
                metrics = self.iteration()
                self.step += 1
                if self.s.eval_every and self.step % self.s.eval_every == 0 and self.step < self.s.steps:
                    metrics.update(self.evaluate())
                self.tracker.log_metrics(metrics, step=self.step)
                bar.update(self.step, metrics)
                self.ctx.step_done(self)


def _sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """One number per completion: the outcome reward, or the sum of a process reward's tokens."""
    return rewards if rewards.dim() == 1 else masked_sum(rewards, mask, dim=-1)


def _kl_shaped_rewards(rewards: Tensor, kl_tokens: Tensor, mask: Tensor, coef: float) -> Tensor:
    """r_t <- r_t - beta * kl_t on every completion token (PPO-style KL in the reward).

    For an outcome reward and a group/batch baseline the per-token rewards are summed into the
    sequence's return, r_i - beta * sum_t kl_{i,t} (as TRL's RLOO does); process rewards stay per
    token.
    """
    if rewards.dim() == 1:
        return rewards - coef * masked_sum(kl_tokens, mask, dim=-1)
    return rewards - coef * kl_tokens * mask


def _select_group_rows(rewards: Tensor, groups: list[int], group_size: int) -> Tensor:
    rows = [g * group_size + i for g in groups for i in range(group_size)]
    return rewards[torch.tensor(rows, dtype=torch.long, device=rewards.device)]


def _cat_rewards(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)
