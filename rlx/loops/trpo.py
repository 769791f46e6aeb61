"""``algo.update=trpo``: trust region policy optimisation (Schulman et al. 2015) as an update rule of
the online loop, for small models (``algo=trpo``).

    g = gradient of the surrogate  L(theta) = aggregate(ratio_t * A_t) + c_ent * aggregate(H_t)
    x = H^-1 g by conjugate gradient, H v = Fisher-vector product = Hessian of the mean
        KL(pi_old || pi_theta) over completion tokens (exact over the vocabulary), + damping * v
    full step = sqrt(2 delta / x^T H x) * x     (the largest step of the quadratic model's trust region)
    backtracking line search: theta_old + 0.5^k * full step, accepted only if the mean KL is
        <= delta and the surrogate improved; if no k works, theta stays theta_old
    with a separate critic (adv_norm=gae): then regress it on the returns, epochs x minibatches

There is no policy optimizer and no learning rate for the policy (``trainer.lr`` is unused but by a
separate critic): the step size comes from ``algo.max_kl`` (delta). Where rlx departs from the paper:
advantages come from the batch's groups (``adv_norm``, GRPO style) unless a critic is asked for
(``algo.critic=separate adv_norm=gae``, the GAE paper's TRPO); the Fisher-vector products use the whole
batch (the paper subsamples 10%); the line search asks for any improvement of the surrogate, not a
share of the linear model's prediction. Full-vocabulary log-probs of pi_old are kept for the batch,
``[N, T, V]``: fine for small vocabularies, not for a 50k-token LM. The value head layout is refused
(the head would share the trunk this rule moves without an optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from rlx.distributed import WholeParameters, all_reduce_dict, all_reduce_sum, all_reduce_tensor
from rlx.errors import require
from rlx.loops import chunks
from rlx.loops.update import UPDATES, Batch, Learner, fit_critic
from rlx.losses.entropy import token_entropy
from rlx.losses.policy import importance_sampled_loss
from rlx.masked import masked_sum
from rlx.models import Policy, token_logp


@dataclass
class TRPOSettings:
    """TRPO's ``algo.*`` keys (defaults in conf/algo/trpo.yaml)."""

    max_kl: float
    damping: float
    cg_iters: int
    max_backtracks: int
    backtrack_ratio: float

    def check(self) -> None:
        require(self.max_kl > 0, f"algo.max_kl (delta) must be > 0, got {self.max_kl}")
        require(self.damping >= 0, f"algo.damping must be >= 0, got {self.damping}")
        require(self.cg_iters >= 1, f"algo.cg_iters must be >= 1, got {self.cg_iters}")
        require(self.max_backtracks >= 1, f"algo.max_backtracks must be >= 1, got {self.max_backtracks}")
        r = self.backtrack_ratio
        require(0 < r < 1, f"algo.backtrack_ratio must be in (0, 1), got {r}")


def check_trpo(algo: Any, kl: Any, kl_estimator: Any) -> None:
    """What TRPO asks of the rest of the config (run at plan time)."""
    require(
        algo.critic != "head",
        "algo.update=trpo with algo.critic=head: the value head shares the policy's trunk, which this "
        "update moves without an optimizer; use algo.critic=separate",
    )
    require(
        algo.critic != "none" or (algo.epochs == 1 and algo.minibatches == 1),
        "algo=trpo takes one step per batch: epochs=minibatches=1 (they count critic steps only with "
        "algo.critic=separate)",
    )
    if kl_estimator is not None:
        require(
            kl.placement == "reward",
            "algo=trpo supports a KL penalty in the reward only (kl.placement=reward)",
        )


def eager_attention(policy: Policy) -> None:
    """Fisher-vector products differentiate twice; PyTorch's fused attention kernels (SDPA) have no
    second derivative, so transformers models switch to their eager attention (the same math)."""
    if hasattr(policy.model, "set_attn_implementation") and getattr(
        policy.model.config, "_attn_implementation", None
    ):
        policy.model.set_attn_implementation("eager")


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


def _objective(
    learner: Learner, batch: Batch, idx: Tensor, num_tokens: float, num_seqs: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(surrogate objective to maximise, the logits, the entropy) on rows ``idx``."""
    ro = batch.rollout
    assert batch.advantages is not None
    mask = ro.mask[idx]
    logits = learner.policy.completion_logits(ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], mask)
    logp = token_logp(logits, ro.tokens[idx], learner.temperature)
    agg = learner.aggregate(num_tokens, num_seqs)
    objective = -agg(importance_sampled_loss(logp, ro.old_logp[idx], batch.advantages[idx]), mask)
    entropy = token_entropy(logits / learner.temperature)
    if learner.algo.entropy_coef:
        objective = objective + learner.algo.entropy_coef * agg(entropy, mask)
    return objective, logits, entropy


def _mean_kl(
    learner: Learner, batch: Batch, idx: Tensor, old_logprobs: Tensor, logits: Tensor, num_tokens: float
) -> Tensor:
    """This chunk's share of the batch's mean KL(pi_old || pi_theta) over completion tokens."""
    logq = torch.log_softmax(logits.float() / learner.temperature, dim=-1)
    old = old_logprobs[idx]
    kl = (old.exp() * (old - logq)).sum(-1)
    return masked_sum(kl, batch.rollout.mask[idx]) / num_tokens


def _flat(grads: tuple[Tensor | None, ...], params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


@UPDATES.register("trpo", settings=TRPOSettings, check=check_trpo, prepare=eager_attention)
def trpo_update(learner: Learner, batch: Batch, *, step: int, kl_coef: float) -> dict[str, float]:
    """One natural-gradient step of the policy in the KL trust region (then the critic's fit).
    h11g: under fsdp2 on the whole parameters, gathered once (`rlx.distributed.WholeParameters`)."""
    with WholeParameters(learner.policy.model):
        metrics = _trpo_policy_step(learner, batch, step=step)
    if "trpo/kl" in metrics and learner.critic is not None:
        metrics.update(fit_critic(learner, batch, step=step))
    metrics["nonfinite/skipped"] = float(learner.guard.skipped)
    return metrics


def _write_parameters(theta: Tensor, params: list[torch.nn.Parameter]) -> None:
    """``vector_to_parameters`` in place: fsdp2's whole parameters view its gathering buffers, which a
    new ``.data`` would detach them from (h11g); the same values in one process."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(theta[offset : offset + n].view_as(p))
            offset += n


def _trpo_policy_step(learner: Learner, batch: Batch, *, step: int) -> dict[str, float]:
    trpo: TRPOSettings = learner.update_settings
    guard = learner.guard
    ro = batch.rollout
    params = [p for p in learner.policy.parameters() if p.requires_grad]
    rows = list(chunks(torch.arange(len(ro.tokens), device=ro.tokens.device), learner.micro_batch_size))
    # h11: global counts; the gradient, Fisher-vector products and line-search values are summed over
    # ranks, so every rank computes the same step and takes the same line-search decisions
    num_tokens = max(all_reduce_sum(ro.mask.sum().item()), 1.0)
    num_seqs = int(all_reduce_sum(len(ro.tokens)))
    # pi_old over the whole vocabulary (the sampling policy: nothing has moved since sampling)
    with torch.no_grad():
        old_logprobs = torch.zeros(*ro.tokens.shape, learner.policy.vocab_size, device=ro.tokens.device)
        for idx in rows:
            logits = learner.policy.completion_logits(
                ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx]
            )
            old_logprobs[idx] = torch.log_softmax(logits.float() / learner.temperature, dim=-1)

    # g: gradient of the surrogate objective at theta_old
    grads = [torch.zeros_like(p) for p in params]
    objective_old = 0.0
    entropy_sum = 0.0
    bad: tuple[float, str] | None = None
    for idx in rows:
        objective, _, entropy = _objective(learner, batch, idx, num_tokens, num_seqs)
        if not math.isfinite(objective.item()):
            bad = (objective.item(), "surrogate")
            break
        for acc, g in zip(grads, torch.autograd.grad(objective, params, allow_unused=True)):
            if g is not None:
                acc += g
        objective_old += objective.item()
        entropy_sum += masked_sum(entropy.detach(), ro.mask[idx]).item()
    if not guard.agreed_ok(bad, "surrogate", step):  # skip: no step this time
        return {"nonfinite/skipped": float(guard.skipped)}
    g = all_reduce_tensor(parameters_to_vector(grads))
    sums = all_reduce_dict({"objective": objective_old, "entropy": entropy_sum})
    objective_old, entropy_sum = sums["objective"], sums["entropy"]
    grad_norm = g.norm().item()
    if not guard.ok(grad_norm, "gradient norm", step):
        return {"nonfinite/skipped": float(guard.skipped)}
    guard.update_done()

    def fvp(v: Tensor) -> Tensor:
        """(Hessian of the mean KL at theta_old) v + damping v, by double backprop."""
        out = torch.zeros_like(v)
        for idx in rows:
            logits = learner.policy.completion_logits(
                ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx]
            )
            kl = _mean_kl(learner, batch, idx, old_logprobs, logits, num_tokens)
            flat = _flat(torch.autograd.grad(kl, params, create_graph=True, allow_unused=True), params)
            out += _flat(torch.autograd.grad(flat.dot(v), params, allow_unused=True), params)
        return all_reduce_tensor(out) + trpo.damping * v

    x, cg_iters = conjugate_gradient(fvp, g, trpo.cg_iters)
    xhx = x.dot(fvp(x)).item()
    theta_old = parameters_to_vector(params).detach().clone()
    full_step = math.sqrt(2 * trpo.max_kl / max(xhx, 1e-20)) * x if xhx > 0 else torch.zeros_like(x)

    @torch.no_grad()
    def evaluate(theta: Tensor) -> tuple[float, float]:
        _write_parameters(theta, params)
        objective = kl = 0.0
        for idx in rows:
            obj, logits, _ = _objective(learner, batch, idx, num_tokens, num_seqs)
            objective += obj.item()
            kl += _mean_kl(learner, batch, idx, old_logprobs, logits, num_tokens).item()
        both = all_reduce_dict({"objective": objective, "kl": kl})
        return both["objective"], both["kl"]

    theta, frac, kl, improvement = backtracking_line_search(
        theta_old,
        full_step,
        evaluate,
        max_kl=trpo.max_kl,
        max_backtracks=trpo.max_backtracks,
        ratio=trpo.backtrack_ratio,
    )
    _write_parameters(theta, params)
    metrics = {
        "loss/policy": -objective_old,
        "loss/total": -objective_old,
        "entropy": entropy_sum / num_tokens,
        "grad_norm": grad_norm,
        "trpo/step_size": frac,
        "trpo/kl": kl,
        "trpo/improvement": improvement,
        "trpo/cg_iters": float(cg_iters),
    }
    return metrics
