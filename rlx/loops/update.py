"""The update: what the online loop does with one finished batch, written once.

``UPDATES[algo.update](learner, batch, step=..., kl_coef=...) -> metrics``:

- ``sgd`` (every preset but trpo): for epoch in 1..epochs, for each of ``minibatches`` shuffled
  minibatches of the global batch (`minibatch_rows`), split into micro-batches for memory:

      loss = aggregate(policy loss)                       # the registry's loss, algo.aggregation
             + vf_coef * token_mean(value loss)           # when there is a critic
             - entropy_coef * aggregate(entropy)
             + beta * aggregate(KL to pi_ref)              # when the KL is in the loss

  backward (accumulated), then the KL early stop (``algo.early_stop_kl``: approx KL(pi_old || pi) of
  this minibatch, computed here from the log-probs, checked before its optimizer step, which it skips
  with the remaining epochs, as Stable-Baselines3), then `optimizer_step`.
- ``trpo`` (rlx/loops/trpo.py): a natural-gradient step in a KL trust region.

Every micro-batch's loss is normalised by its minibatch's token and sequence counts, so gradient
accumulation gives exactly the unsplit minibatch's update. The value loss is always a token mean
over the minibatch (as TRL and OpenRLHF), whatever ``algo.aggregation``.

The terms in the log-probs (`logp_terms`: the policy loss, the entropy bonus, the KL) go into the fused
LM head as a `FusedLoss` when every piece is declared token-local (`Learner.fuses_loss`): their
gradient through the head is then formed in the forward, and their value is computed on the same
log-probs either way.

An update is a function of a `Batch` and a `Learner`: tests call it on a hand-built batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlx import distributed
from rlx.distributed import (
    all_reduce_dict,
    all_reduce_sum,
    finite_everywhere,
    passes_everywhere,
    union_keys,
)
from rlx.loops import NonFiniteGuard, chunks, host_floats
from rlx.loops.optim import optimizer_step, zero_grad
from rlx.losses.aggregation import token_mean
from rlx.losses.value import clipped_value_loss
from rlx.masked import masked_mean, masked_sum
from rlx.models import Policy
from rlx.models.logprobs import CompletionScores, FusedLoss
from rlx.models.value import Critic
from rlx.registry import Registry, Resolved
from rlx.rollout import Rollout

UPDATES = Registry("update rule", ["rlx.loops"])


@dataclass
class Batch:
    """One iteration's data as it moves through the online loop's stages, ``[N, T]`` tensors.

    collect -> ``rollout``, ``rewards`` (as the reward returned them: ``[N]`` outcome or ``[N, T]``
    process); reference -> ``ref_logp``, ``ref_kl``; critic -> ``values`` (V_old); shape -> ``token_rewards``;
    advantages -> ``advantages`` (and ``returns`` = A + V with a critic).
    """

    rollout: Rollout
    rewards: Tensor
    ref_logp: Tensor | None = None
    ref_kl: Tensor | None = None  # per-token KL estimate to pi_ref at sampling time, masked
    values: Tensor | None = None
    token_rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> Tensor:
        return self.rollout.mask


@dataclass
class Pieces:
    """The pluggable math, bound to its hyperparameters."""

    reward: Resolved
    advantage: Resolved
    policy_loss: Resolved
    aggregation: Resolved
    kl: Resolved | None


@dataclass
class Learner:
    """What an update changes and how: the policy (and critic), their optimizers, the loss pieces.

    ``optimizers`` are (optimizer, scheduler) pairs: the policy's first (over the value head too in
    the ``head`` layout), then a separate critic's. Under ``trpo`` the policy has none.
    """

    policy: Policy
    critic: Critic | None
    optimizers: list[tuple[torch.optim.Optimizer, Any]]
    pieces: Pieces
    algo: Any  # OnlineAlgoSettings
    update_settings: Any  # the update rule's own settings (TRPOSettings), or None
    guard: NonFiniteGuard
    micro_batch_size: int | None
    grad_clip: float | None
    temperature: float
    max_len: int
    kl_in_loss: bool = False
    seed: int = 0  # trainer.seed: the minibatch draw's (`minibatch_rows`)

    def aggregate(self, num_tokens: float, num_seqs: int) -> Callable[[Tensor, Tensor], Tensor]:
        """``algo.aggregation`` with the minibatch's counts (what makes micro-batches add up)."""
        agg, max_len = self.pieces.aggregation, self.max_len
        return lambda x, mask: agg(x, mask, num_tokens, num_seqs, max_len=max_len)

    @property
    def fuses_loss(self) -> bool:
        """Whether the loss's terms in the log-probs can go into the fused head (`FusedLoss`): a policy
        loss (and KL estimator, when the KL is in the loss) declared ``token_local``, aggregated by a
        ``linear`` aggregation. A piece registered without the declaration takes the ordinary path."""
        pieces = [self.pieces.policy_loss] + ([self.pieces.kl] if self.kl_in_loss and self.pieces.kl else [])
        return self.pieces.aggregation.entry.meta.get("linear", False) and all(
            p.entry.meta.get("token_local", False) for p in pieces
        )

    def forward(
        self, ro: Rollout, idx: Tensor, *, entropy: bool, fused_loss: FusedLoss | None = None
    ) -> tuple[CompletionScores, Tensor | None]:
        """Log-probs (and the entropy when asked) of rows ``idx`` and, with a critic, their values; one
        pass when the trunk is shared. No ``[N, T, V]`` logits (`Policy.score`, which says what
        ``fused_loss`` does)."""
        args = (ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx])
        shared = self.critic is not None and self.critic.shared
        scores = self.policy.score(
            *args, self.temperature, entropy=entropy, hidden=shared, fused_loss=fused_loss
        )
        if self.critic is None:
            return scores, None
        if shared:
            assert scores.hidden is not None
            return scores, self.critic.values_from_hidden(scores.hidden)
        return scores, self.critic.values(*args)


def minibatch_gradients(
    learner: Learner, batch: Batch, rows: Tensor, *, step: int, kl_coef: float, log_entropy: bool = True
) -> tuple[dict[str, float] | None, float]:
    """Forward and backward over ``rows`` in micro-batches, gradients accumulated.

    The entropy (a full-vocabulary pass, chunked) is computed only when the entropy bonus is on or
    ``log_entropy`` asks for the metric (h12: `sgd_update` asks on the first epoch only).

    Returns the minibatch's metrics (None when a non-finite loss dropped it, ``on_nonfinite=skip``) and
    its approx KL(pi_old || pi) (k3, token mean; computed only when the early stop is on).
    """
    ro, algo = batch.rollout, learner.algo
    # h11: the counts of the minibatch over all ranks, so every rank's share of the loss is divided by
    # the global number of tokens / sequences (a per-rank token mean would weight ranks equally)
    num_tokens = all_reduce_sum(ro.mask[rows].sum().item())
    num_seqs = int(all_reduce_sum(len(rows)))
    agg = learner.aggregate(num_tokens, num_seqs)
    zero_grad(learner.optimizers)
    m: dict[str, float] = defaultdict(float)
    kl_old_sum = 0.0
    bad: tuple[float, str] | None = None  # h11: a non-finite loss here, agreed with the other ranks below
    parts = list(chunks(rows, learner.micro_batch_size)) if len(rows) else []
    # fsdp2: every rank runs as many passes as the rank with the most micro-batches (h11g)
    passes = passes_everywhere(len(parts), learner.policy.model)
    for k in range(passes):
        if k >= len(parts):  # fsdp2: this rank has no rows left; a pass that adds nothing
            if not zero_weight_pass(learner, batch, rows):
                break
            continue
        idx = parts[k]
        share = len(idx) / num_seqs
        mask = ro.mask[idx]

        terms_of = partial(logp_terms, learner, batch, idx, mask, agg, kl_coef)
        fused = None
        if learner.fuses_loss:  # the loss's gradient through the LM head formed in its forward
            fused = FusedLoss(partial(total_of, terms_of), ro.old_logp[idx], bool(algo.entropy_coef))
        scores, values = learner.forward(
            ro, idx, entropy=bool(algo.entropy_coef) or log_entropy, fused_loss=fused
        )
        logp, entropy = scores.logp, scores.entropy
        terms = terms_of(logp, entropy)
        policy_loss, loss_metrics = terms.policy, terms.metrics
        # the value of the loss is computed on the log-probs either way; on the fused head they carry
        # no gradient and the zero `head_grad` carries it
        total = terms.total if scores.head_grad is None else terms.total.detach() + scores.head_grad
        # The micro-batch's figures: sums over micro-batches (the losses, already divided by the global
        # counts) and means weighted by the rows' share (the entropy and the losses' own metrics)
        sums = {"loss/total": total, "loss/policy": policy_loss}
        shares = dict(loss_metrics)
        if values is not None:
            assert batch.values is not None and batch.returns is not None
            value_tokens, value_metrics = clipped_value_loss(
                values, batch.values[idx], batch.returns[idx], mask, clip_range=algo.cliprange_value
            )
            value_loss = token_mean(value_tokens, mask, num_tokens, num_seqs)
            total = total + algo.vf_coef * value_loss
            sums["loss/total"], sums["loss/value"] = total, value_loss
            shares.update(value_metrics)
        if terms.kl is not None:
            sums["loss/kl"] = terms.kl
        if entropy is not None:
            shares["entropy"] = masked_mean(entropy.detach(), mask)
        kl_old: dict[str, Tensor] = {}
        if algo.early_stop_kl is not None:
            log_ratio = (logp - ro.old_logp[idx]).detach()
            kl_old["kl_old_sum"] = masked_sum(torch.expm1(log_ratio) - log_ratio, mask)
        # h12: all of them read from the device in one transfer, where one `.item()` each was a host
        # sync each on a GPU; before the backward, which a non-finite loss skips
        read = host_floats({**sums, **shares, **kl_old})
        everywhere = finite_everywhere(total, learner.policy.model)  # fsdp2: the ranks agree first
        if not math.isfinite(read["loss/total"]):
            losses = [f"policy loss {read['loss/policy']}"]
            if values is not None:
                losses.append(f"value loss {read['loss/value']}")
            bad = (read["loss/total"], f"loss ({', '.join(losses)})")
            break
        if not everywhere:  # another rank's loss is not finite: stop here too (agreed below)
            break
        total.backward()
        kl_old_sum += read.get("kl_old_sum", 0.0)
        for k in sums:
            m[k] += read[k]
        for k in shares:
            m[k] += share * read[k]
    if not learner.guard.agreed_ok(bad, "loss", step):
        return None, 0.0
    # h11: the metrics are shares of the global minibatch: their sum over ranks is its value
    m = defaultdict(float, all_reduce_dict(m, keys=union_keys(m)))
    return m, all_reduce_sum(kl_old_sum) / max(num_tokens, 1.0)


@dataclass
class LogpTerms:
    """The loss's terms in the policy's log-probs (and entropies) for one micro-batch: ``total`` =
    ``policy`` - entropy_coef * aggregate(entropy) + beta * ``kl``, and the policy loss's metrics."""

    total: Tensor
    policy: Tensor
    kl: Tensor | None
    metrics: dict[str, Any]


def logp_terms(
    learner: Learner,
    batch: Batch,
    idx: Tensor,
    mask: Tensor,
    agg: Callable[[Tensor, Tensor], Tensor],
    kl_coef: float,
    logp: Tensor,
    entropy: Tensor | None,
) -> LogpTerms:
    """The terms of the module docstring's loss that read the log-probs, for rows ``idx``."""
    assert batch.advantages is not None
    per_token, metrics = learner.pieces.policy_loss(
        logp, batch.rollout.old_logp[idx], batch.advantages[idx], mask
    )
    policy_loss = agg(per_token, mask)
    total = policy_loss
    if learner.algo.entropy_coef:
        assert entropy is not None
        total = total - learner.algo.entropy_coef * agg(entropy, mask)
    kl_loss = None
    if learner.kl_in_loss:
        assert batch.ref_logp is not None and learner.pieces.kl is not None
        kl_loss = agg(learner.pieces.kl(logp, batch.ref_logp[idx]), mask)
        total = total + kl_coef * kl_loss
    return LogpTerms(total, policy_loss, kl_loss, metrics)


def total_of(
    terms_of: Callable[[Tensor, Tensor | None], LogpTerms], logp: Tensor, entropy: Tensor | None
) -> Tensor:
    return terms_of(logp, entropy).total


def zero_weight_pass(learner: Learner, batch: Batch, rows: Tensor) -> bool:
    """fsdp2 (h11g): a forward and backward that change no gradient, for a rank with fewer micro-batches
    than another (every pass over a sharded model is a collective: all-gather, reduce-scatter). One of
    this rank's rows (its batch's first when ``rows`` is empty) through the same forward as a real pass,
    so the same parameters receive gradients, with its loss multiplied by 0: the gradients it adds are
    exact zeros. Takes part in the real passes' agreement on finiteness; False when another rank's loss
    was not finite."""
    ro = batch.rollout
    idx = (rows if len(rows) else torch.arange(len(ro.tokens), device=ro.tokens.device))[:1]
    scores, values = learner.forward(ro, idx, entropy=False)
    zero = scores.logp.sum() * 0.0
    if values is not None:
        zero = zero + values.sum() * 0.0
    # its own value does not count (a multiple of 0); it takes part in the real passes' agreement
    if not finite_everywhere(torch.zeros(()), learner.policy.model):
        return False
    zero.backward()
    return True


def minibatch_rows(n: int, minibatches: int, *, seed: int, step: int, epoch: int) -> list[Tensor]:
    """This rank's rows of each of ``minibatches`` minibatches of the *global* batch, for one epoch.

    The global batch (every rank's ``n`` rows, in rank order) is permuted by a generator seeded with
    (trainer.seed, step, epoch), the same on every rank and in one process, and cut into minibatches of
    N // minibatches rows (a remainder is left out, as in one process); a rank takes the members that
    are its own rows. So 2 ranks update on exactly the minibatches one process does, where a per-rank
    shuffle (TRL's) would draw other ones. The draw keeps no state (resume needs nothing) and does not
    depend on how much of the global RNG sampling used. One minibatch: the rows in order."""
    if minibatches <= 1:  # the same on every rank (a setting): no gather needed
        return [torch.arange(n)]
    counts = [n] if not distributed.active() else [int(c) for c in distributed.gather_objects(n)]
    offset, total = sum(counts[: distributed.world()[0]]), sum(counts)
    state = np.random.SeedSequence([seed, step, epoch]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    perm = torch.randperm(total, generator=generator)
    size = total // minibatches
    out = []
    for mb in range(minibatches):
        members = perm[mb * size : (mb + 1) * size]
        out.append(members[(members >= offset) & (members < offset + n)] - offset)
    return out


@UPDATES.register("sgd")
def sgd_update(learner: Learner, batch: Batch, *, step: int, kl_coef: float) -> dict[str, float]:
    """epochs x minibatches x micro-batches of the loss above, one `optimizer_step` per minibatch."""
    ro, algo = batch.rollout, learner.algo
    n = len(ro.tokens)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    steps_done = 0
    stopped = False
    for epoch in range(algo.epochs):
        parts = minibatch_rows(n, algo.minibatches, seed=learner.seed, step=step, epoch=epoch)
        for rows in parts:
            rows = rows.to(ro.tokens.device)
            m, kl_old = minibatch_gradients(  # h12: the entropy metric from the first epoch only
                learner, batch, rows, step=step, kl_coef=kl_coef, log_entropy=epoch == 0
            )
            if m is None:  # trainer.on_nonfinite=skip: this update is dropped
                zero_grad(learner.optimizers)
                continue
            # KL early stop: this minibatch measured how far the previous steps moved pi from pi_old
            if algo.early_stop_kl is not None and kl_old > 1.5 * algo.early_stop_kl:
                zero_grad(learner.optimizers)
                sums["kl/old"] += m["kl/old"]
                counts["kl/old"] += 1
                stopped = True
                break
            lr = learner.optimizers[0][0].param_groups[0]["lr"]  # the rate this step uses
            grad_norm = optimizer_step(
                learner.optimizers, grad_clip=learner.grad_clip, guard=learner.guard, step=step
            )
            if grad_norm is None:
                continue
            m["grad_norm"] = grad_norm
            m["lr"] = lr
            steps_done += 1
            for k, v in m.items():
                sums[k] += v
                counts[k] += 1
        if stopped:
            break
    out = {k: sums[k] / counts[k] for k in sums}
    out["early_stop"] = steps_done / algo.minibatches  # epochs done (< algo.epochs: stopped early)
    out["nonfinite/skipped"] = float(learner.guard.skipped)
    return out


def fit_critic(learner: Learner, batch: Batch, *, step: int) -> dict[str, float]:
    """Regress a separate critic on the returns for epochs x minibatches (value loss only): the value
    fit of an update rule that moves the policy without an optimizer (trpo)."""
    assert learner.critic is not None and batch.values is not None and batch.returns is not None
    ro, algo = batch.rollout, learner.algo
    n = len(ro.tokens)
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    for epoch in range(algo.epochs):
        for rows in minibatch_rows(n, algo.minibatches, seed=learner.seed, step=step, epoch=epoch):
            rows = rows.to(ro.tokens.device)
            num_tokens = all_reduce_sum(ro.mask[rows].sum().item())  # h11: global counts
            num_seqs = int(all_reduce_sum(len(rows)))
            zero_grad(learner.optimizers)
            loss_sum, clip_frac = 0.0, 0.0
            bad: tuple[float, str] | None = None
            for idx in chunks(rows, learner.micro_batch_size) if len(rows) else ():
                args = (ro.prompt_ids[idx], ro.prompt_mask[idx], ro.tokens[idx], ro.mask[idx])
                mask = ro.mask[idx]
                value_tokens, vm = clipped_value_loss(
                    learner.critic.values(*args),
                    batch.values[idx],
                    batch.returns[idx],
                    mask,
                    clip_range=algo.cliprange_value,
                )
                loss = token_mean(value_tokens, mask, num_tokens, num_seqs)
                read = host_floats({"loss": loss, "clip_frac": vm["value/clip_frac"]})  # one transfer
                if not math.isfinite(read["loss"]):
                    bad = (read["loss"], f"value loss {read['loss']}")
                    break
                loss.backward()
                loss_sum += read["loss"]
                clip_frac += len(idx) / num_seqs * read["clip_frac"]
            if learner.guard.agreed_ok(bad, "value loss", step):
                loss_sum, clip_frac = all_reduce_sum(loss_sum), all_reduce_sum(clip_frac)
                norm = optimizer_step(
                    learner.optimizers,
                    grad_clip=learner.grad_clip,
                    guard=learner.guard,
                    step=step,
                    names=("critic gradient norm",),
                )
                if norm is not None:
                    sums["loss/value"] += loss_sum
                    sums["value/clip_frac"] += clip_frac
                    steps += 1
                continue
            zero_grad(learner.optimizers)
    return {k: v / max(steps, 1) for k, v in sums.items()}
