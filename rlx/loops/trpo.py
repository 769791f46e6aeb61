"""``algo=trpo``: trust region policy optimisation (Schulman et al. 2015) for small models.

    for iteration:
        sample G completions per prompt with pi_old; rewards; group advantages (adv_norm, as GRPO)
        g = gradient of the surrogate  L(theta) = aggregate(ratio_t * A_t) + c_ent * aggregate(H_t)
        x = H^-1 g by conjugate gradient, H v = Fisher-vector product = Hessian of the mean
            KL(pi_old || pi_theta) over completion tokens (exact over the vocabulary), + damping * v
        full step = sqrt(2 delta / x^T H x) * x     (the largest step of the quadratic model's trust region)
        backtracking line search: theta_old + 0.5^k * full step, accepted only if the mean KL is
            <= delta and the surrogate improved; if no k works, theta stays theta_old

There is no optimizer and no learning rate (``trainer.lr`` is unused): the step size comes from
``algo.max_kl`` (delta). Where rlx departs from the paper: advantages are group-based (``adv_norm``,
GRPO style) rather than from a value function (no critic in this loop); the Fisher-vector products
use the whole batch (the paper subsamples 10%); the line search asks for any improvement of the
surrogate, not a share of the linear model's prediction. Full-vocabulary log-probs of pi_old are
kept for the batch, ``[N, T, V]``: fine for small vocabularies, not for a 50k-token LM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from rlx.errors import require
from rlx.loops import LOOPS, LoopContext
from rlx.loops import chunks as _chunks
from rlx.loops.online import OnlinePlan, OnlineTrainer, _kl_shaped_rewards, plan_online
from rlx.losses.entropy import token_entropy
from rlx.losses.policy import importance_sampled_loss
from rlx.masked import masked_mean, masked_sum
from rlx.models import Policy, token_logp
from rlx.registry import check_type
from rlx.rollout import Rollout
from rlx.tasks import Task

TRPO_TYPES: dict[str, Any] = {
    "max_kl": float,
    "damping": float,
    "cg_iters": int,
    "max_backtracks": int,
    "backtrack_ratio": float,
}


@dataclass
class TRPOSettings:
    max_kl: float
    damping: float
    cg_iters: int
    max_backtracks: int
    backtrack_ratio: float


@dataclass
class TRPOPlan(OnlinePlan):
    trpo: TRPOSettings


def plan_trpo(c: dict[str, Any], task: Task) -> TRPOPlan:
    """The online loop's checks, then TRPO's: delta, damping, CG and line-search settings."""
    op = plan_online(c, task)
    a = c["algo"]
    for key, kind in TRPO_TYPES.items():
        check_type(f"algo.{key}", a.get(key), kind)
    require(a["max_kl"] > 0, f"algo.max_kl (delta) must be > 0, got {a['max_kl']}")
    require(a["damping"] >= 0, f"algo.damping must be >= 0, got {a['damping']}")
    require(a["cg_iters"] >= 1, f"algo.cg_iters must be >= 1, got {a['cg_iters']}")
    require(a["max_backtracks"] >= 1, f"algo.max_backtracks must be >= 1, got {a['max_backtracks']}")
    require(
        0 < a["backtrack_ratio"] < 1, f"algo.backtrack_ratio must be in (0, 1), got {a['backtrack_ratio']}"
    )
    require(
        a["epochs"] == 1 and a["minibatches"] == 1, "algo=trpo takes one step per batch: epochs=minibatches=1"
    )
    if op.pieces.kl is not None:
        require(
            op.settings.kl_placement == "reward",
            "algo=trpo supports a KL penalty in the reward only (kl.placement=reward)",
        )
    settings = TRPOSettings(
        max_kl=float(a["max_kl"]),
        damping=float(a["damping"]),
        cg_iters=int(a["cg_iters"]),
        max_backtracks=int(a["max_backtracks"]),
        backtrack_ratio=float(a["backtrack_ratio"]),
    )
    return TRPOPlan(op.settings, op.pieces, settings)


@LOOPS.register("trpo", plan=plan_trpo)
def build_trpo(ctx: LoopContext) -> TRPOTrainer:
    policy = ctx.build_policy()
    # Fisher-vector products differentiate twice; PyTorch's fused attention kernels (SDPA) have no
    # second derivative, so transformers models switch to their eager attention (the same math).
    if hasattr(policy.model, "set_attn_implementation") and getattr(
        policy.model.config, "_attn_implementation", None
    ):
        policy.model.set_attn_implementation("eager")
    return TRPOTrainer(ctx=ctx, policy=policy)


def conjugate_gradient(
    fvp: Callable[[Tensor], Tensor], b: Tensor, iters: int, tol: float = 1e-10
) -> tuple[Tensor, int]:
    """Solve H x = b for symmetric positive-definite H given only v -> H v (Hestenes & Stiefel 1952).
    Returns x and the number of iterations run."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for i in range(iters):
        hp = fvp(p)
        alpha = rr / p.dot(hp).clamp(min=1e-20)
        x += alpha * p
        r -= alpha * hp
        rr_new = r.dot(r)
        if rr_new < tol:
            return x, i + 1
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, iters


def backtracking_line_search(
    theta_old: Tensor,
    full_step: Tensor,
    evaluate: Callable[[Tensor], tuple[float, float]],
    *,
    max_kl: float,
    max_backtracks: int = 10,
    ratio: float = 0.5,
) -> tuple[Tensor, float, float, float]:
    """Try theta_old + ratio^k * full_step for k = 0, 1, ...; accept the first whose mean KL to pi_old is
    <= max_kl and whose surrogate objective (to maximise) improved on theta_old's.

    ``evaluate(theta) -> (objective, kl)``. Returns (theta, accepted fraction, kl, improvement); when
    nothing is accepted: (theta_old, 0.0, 0.0, 0.0), the policy unchanged.
    """
    base, _ = evaluate(theta_old)
    for k in range(max_backtracks):
        frac = ratio**k
        theta = theta_old + frac * full_step
        objective, kl = evaluate(theta)
        if math.isfinite(objective) and math.isfinite(kl) and kl <= max_kl and objective > base:
            return theta, frac, kl, objective - base
    return theta_old, 0.0, 0.0, 0.0


class TRPOTrainer(OnlineTrainer):
    """TRPO: the online loop's sampling, scoring and evaluation; a natural-gradient step per batch."""

    def __init__(self, *, ctx: LoopContext, policy: Policy) -> None:
        super().__init__(ctx=ctx, policy=policy, optimizer=None, scheduler=None)  # type: ignore[arg-type]
        tp: TRPOPlan = ctx.plan.settings
        self.trpo = tp.trpo
        self.params = [p for p in policy.parameters() if p.requires_grad]

    # -- pieces of the step --------------------------------------------------------------------
    def _chunks(self, ro: Rollout) -> list[Tensor]:
        return list(_chunks(torch.arange(len(ro.tokens), device=ro.tokens.device), self.s.micro_batch_size))

    def _objective(
        self, ro: Rollout, idx: Tensor, advantages: Tensor, num_tokens: float, num_seqs: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(surrogate objective to maximise, the logits, the entropy) on rows ``idx``."""
        mask = ro.mask[idx]
        logits = self.policy.completion_logits(ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], mask)
        temperature = self.s.sampling.temperature
        logp = token_logp(logits, ro.tokens[idx], temperature)
        agg = self._aggregate_fn(num_tokens, num_seqs)
        objective = -agg(importance_sampled_loss(logp, ro.old_logp[idx], advantages[idx]), mask)
        entropy = token_entropy(logits / temperature)
        if self.s.entropy_coef:
            objective = objective + self.s.entropy_coef * agg(entropy, mask)
        return objective, logits, entropy

    def _mean_kl(
        self, ro: Rollout, idx: Tensor, old_logprobs: Tensor, logits: Tensor, num_tokens: float
    ) -> Tensor:
        """This chunk's share of the batch's mean KL(pi_old || pi_theta) over completion tokens."""
        logq = torch.log_softmax(logits.float() / self.s.sampling.temperature, dim=-1)
        old = old_logprobs[idx]
        kl = (old.exp() * (old - logq)).sum(-1)
        return masked_sum(kl, ro.mask[idx]) / num_tokens

    # -- one iteration -------------------------------------------------------------------------
    def iteration(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.maybe_refresh_reference()
        ro, rewards, metrics = self.collect()
        shaped = rewards
        if self.ref is not None and self.p.kl is not None:
            kl_tokens = self.p.kl(ro.old_logp, self.reference_logp(ro)) * ro.mask
            metrics["kl/ref"] = masked_mean(kl_tokens, ro.mask).item()
            shaped = _kl_shaped_rewards(rewards, kl_tokens, ro.mask, self.s.kl_coef)
        advantages = self.p.advantage(shaped, self.s.group_size, ro.mask)
        metrics["adv/mean"] = masked_mean(advantages, ro.mask).item()
        t1 = time.perf_counter()
        metrics.update(self.trpo_step(ro, advantages))
        t2 = time.perf_counter()
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/update_s"] = t2 - t1
        metrics["throughput/tokens_per_s"] = ro.mask.sum().item() / max(t2 - t0, 1e-9)
        if self.s.samples_every and self.step % self.s.samples_every == 0:
            self._write_samples(ro, rewards, advantages)
        return metrics

    def trpo_step(self, ro: Rollout, advantages: Tensor) -> dict[str, float]:
        chunks = self._chunks(ro)
        num_tokens = max(ro.mask.sum().item(), 1.0)
        num_seqs = len(ro.tokens)
        temperature = self.s.sampling.temperature
        # pi_old over the whole vocabulary (the sampling policy: nothing has moved since sampling)
        with torch.no_grad():
            old_logprobs = torch.zeros(*ro.tokens.shape, self.policy.vocab_size, device=ro.tokens.device)
            for idx in chunks:
                logits = self.policy.completion_logits(
                    ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx]
                )
                old_logprobs[idx] = torch.log_softmax(logits.float() / temperature, dim=-1)

        # g: gradient of the surrogate objective at theta_old
        grads = [torch.zeros_like(p) for p in self.params]
        objective_old = 0.0
        entropy_sum = 0.0
        for idx in chunks:
            objective, _, entropy = self._objective(ro, idx, advantages, num_tokens, num_seqs)
            if not self.ctx.nonfinite.ok(objective, "surrogate", self.step):  # skip: no step this time
                return {"nonfinite/skipped": float(self.ctx.nonfinite.skipped)}
            for acc, g in zip(grads, torch.autograd.grad(objective, self.params, allow_unused=True)):
                if g is not None:
                    acc += g
            objective_old += objective.item()
            entropy_sum += masked_sum(entropy.detach(), ro.mask[idx]).item()
        g = parameters_to_vector(grads)
        grad_norm = g.norm().item()
        if not self.ctx.nonfinite.ok(grad_norm, "gradient norm", self.step):
            return {"nonfinite/skipped": float(self.ctx.nonfinite.skipped)}
        self.ctx.nonfinite.update_done()

        def fvp(v: Tensor) -> Tensor:
            """(Hessian of the mean KL at theta_old) v + damping v, by double backprop."""
            out = torch.zeros_like(v)
            for idx in chunks:
                logits = self.policy.completion_logits(
                    ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx]
                )
                kl = self._mean_kl(ro, idx, old_logprobs, logits, num_tokens)
                kl_grad = torch.autograd.grad(kl, self.params, create_graph=True, allow_unused=True)
                flat = torch.cat(
                    [
                        (k if k is not None else torch.zeros_like(p)).reshape(-1)
                        for k, p in zip(kl_grad, self.params)
                    ]
                )
                hv = torch.autograd.grad(flat.dot(v), self.params, allow_unused=True)
                out += torch.cat(
                    [
                        (h if h is not None else torch.zeros_like(p)).reshape(-1)
                        for h, p in zip(hv, self.params)
                    ]
                )
            return out + self.trpo.damping * v

        x, cg_iters = conjugate_gradient(fvp, g, self.trpo.cg_iters)
        xhx = x.dot(fvp(x)).item()
        theta_old = parameters_to_vector(self.params).detach().clone()
        full_step = math.sqrt(2 * self.trpo.max_kl / max(xhx, 1e-20)) * x if xhx > 0 else torch.zeros_like(x)

        @torch.no_grad()
        def evaluate(theta: Tensor) -> tuple[float, float]:
            vector_to_parameters(theta, self.params)
            objective = kl = 0.0
            for idx in chunks:
                obj, logits, _ = self._objective(ro, idx, advantages, num_tokens, num_seqs)
                objective += obj.item()
                kl += self._mean_kl(ro, idx, old_logprobs, logits, num_tokens).item()
            return objective, kl

        theta, frac, kl, improvement = backtracking_line_search(
            theta_old,
            full_step,
            evaluate,
            max_kl=self.trpo.max_kl,
            max_backtracks=self.trpo.max_backtracks,
            ratio=self.trpo.backtrack_ratio,
        )
        vector_to_parameters(theta, self.params)
        return {
            "loss/policy": -objective_old,
            "loss/total": -objective_old,
            "entropy": entropy_sum / num_tokens,
            "grad_norm": grad_norm,
            "trpo/step_size": frac,
            "trpo/kl": kl,
            "trpo/improvement": improvement,
            "trpo/cg_iters": float(cg_iters),
            "nonfinite/skipped": float(self.ctx.nonfinite.skipped),
        }
