"""What the offline loop does per kind of loss input, chosen once, and its one optimizer step.

A registered offline loss declares the inputs it needs (``inputs=`` in `rlx.losses.preference`);
`FEEDS` maps that declaration to the `Feed` that builds the model, reads the rows and computes the
loss of a micro-batch:

=================  ============================================================================
inputs             feed
=================  ============================================================================
``completions``    `CompletionsFeed`: token log-probs of prompt -> completion rows (SFT; packing)
``pairs``          `PairsFeed`: sequence log-probs of chosen and rejected in one forward, and of a
                   frozen reference (under no_grad, or precomputed once) (DPO, IPO)
``scored_pairs``   `ScoredPairsFeed`: `PairsFeed` plus the rows' scores (SPO)
``reward_pairs``   `RewardPairsFeed`: a sequence-classification reward model's scores (RM)
=================  ============================================================================

`offline_step` is one optimizer step over a batch: micro-batches (every loss normalised by the
whole batch's count, so micro-batching does not change the gradient), backward, then
`rlx.loops.optim.optimizer_step` (clip, non-finite guard, step, scheduler), as the online loop.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from rlx.data.encode import Encoded, PackedRow, pad_batch
from rlx.distributed import (
    all_reduce_dict,
    all_reduce_sum,
    finite_everywhere,
    passes_everywhere,
    union_keys,
)
from rlx.loops import chunks, host_floats
from rlx.loops.optim import optimizer_step
from rlx.losses.aggregation import token_mean
from rlx.masked import masked_sum
from rlx.models import Policy
from rlx.models.logprobs import CompletionScores, FusedLoss, score_packed
from rlx.models.reward_model import RewardModelHandle, encode_for_reward, reward_scores
from rlx.registry import Resolved
from rlx.tracking import LiveProgress

if TYPE_CHECKING:
    from rlx.loops import LoopContext

Items = Encoded | list[PackedRow]  # what a feed computes the loss of: encoded rows, or packed rows (SFT)


class Feed:
    """How the loop feeds one kind of loss input; subclasses set the class attributes."""

    inputs: ClassVar[str]  # the loss's declaration this feed serves
    data_kind: ClassVar[str]  # the rows read from data.train (`rlx.data.KINDS`)
    train_mode: ClassVar[bool] = False  # dropout as configured while training (else eval mode)
    evaluates_policy: ClassVar[bool] = True  # the trained model is a policy (task evaluation applies)
    packs: ClassVar[bool] = False  # algo.packing is allowed

    def __init__(
        self,
        policy: Any,
        loss: Resolved,
        *,
        max_len: int,
        precompute_ref: bool = False,
        ref_dtype: torch.dtype | None = None,
    ) -> None:
        """``max_len``: the longest prompt + completion the model reads (the algo limits, capped by
        its context); ``precompute_ref``: reference log-probs once, before training (pairs only)."""
        self.policy = policy  # a `Policy`, or a `RewardModelHandle`
        self.loss = loss
        self.max_len = max_len

    @classmethod
    def build_model(cls, ctx: LoopContext) -> tuple[Any, Policy]:
        """(the model being trained, the policy whose tokenizer encodes the rows)."""
        policy = ctx.build_policy()
        return policy, policy

    @property
    def model(self) -> torch.nn.Module:
        return self.policy.model

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def pad_id(self) -> int:
        tok = self.policy.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    def norm(self, data: Items, rows: list[int]) -> float:
        """What the batch's loss is divided by: its pair count (tokens for completions)."""
        return float(len(rows))

    def micro_loss(
        self, data: Items, rows: list[int], cache: Tensor | None, norm: float
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The loss of ``rows`` normalised by the whole batch's ``norm``, and its metrics (sums / norm),
        left on the device for the caller to read at once (`host_floats`). ``cache``: precomputed
        reference log-probs ``[N, 2]`` of ``data`` (pairs), else None."""
        raise NotImplementedError

    # the frozen reference (pairs only): set up, checkpointed, used
    def prepare(self, data: Encoded, eval_data: Encoded | None, size: int, show: bool) -> None:
        """Work before the first step (the reference's log-probs when they are precomputed)."""

    def reference_cache(self, held_out: bool) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"ref": None, "ref_logps": None, "eval_ref_logps": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def eval_metrics(self, out: dict[str, float]) -> dict[str, float]:
        """The held-out metrics under the names the README promises."""
        return out


class CompletionsFeed(Feed):
    """SFT: the per-token loss of completion tokens, aggregated with ``token_mean`` over the batch."""

    inputs = "completions"
    data_kind = "sft"
    train_mode = True  # SFT trains in train mode (dropout as configured, e.g. LoRA dropout)
    packs = True

    def norm(self, data: Items, rows: list[int]) -> float:
        if isinstance(data, Encoded):
            return float(sum(len(data.first[i]) for i in rows))
        return float(sum(sum(data[i][1][1:]) for i in rows))

    def micro_loss(
        self, data: Items, rows: list[int], cache: Tensor | None, norm: float
    ) -> tuple[Tensor, dict[str, float]]:
        if isinstance(data, Encoded):
            p_ids, p_mask, c_ids, c_mask = pad_batch(
                [data.prompts[i] for i in rows], [data.first[i] for i in rows], self.pad_id(), self.device
            )
            scores = self.policy.score(p_ids, p_mask, c_ids, c_mask, fused_loss=self.fused(c_mask, norm))
            mask = c_mask
        else:
            scores, mask = self.packed_scores([data[i] for i in rows], norm)
        logp, head_grad = scores.logp, scores.head_grad
        loss = self.sft_loss(logp, None, mask=mask, norm=norm)
        if head_grad is not None:  # the log-probs carry no gradient: the zero `head_grad` does
            loss = loss.detach() + head_grad
        return loss, {"loss/sft": loss}

    def sft_loss(self, logp: Tensor, entropy: Tensor | None, *, mask: Tensor, norm: float) -> Tensor:
        """The loss's per-token values, ``token_mean`` over the batch's ``norm`` tokens."""
        per_token, _ = self.loss(logp, mask)
        return token_mean(per_token, mask, num_tokens=norm)

    def fused(self, mask: Tensor, norm: float) -> FusedLoss | None:
        """The loss for the fused head when it is token-local (the NLL is): its gradient is formed in
        the head's forward."""
        if not self.loss.entry.meta.get("token_local"):
            return None
        return FusedLoss(partial(self.sft_loss, mask=mask, norm=norm), torch.zeros_like(mask))

    def packed_scores(self, packed: list[PackedRow], norm: float) -> tuple[CompletionScores, Tensor]:
        """Token log-probs and loss mask ``[n, width - 1]`` of packed rows (positions restart per
        example, `rlx.data.encode.pack_rows`), through the fused head where the model allows it
        (`score_packed`)."""
        width = max(len(row[0]) for row in packed)
        n = len(packed)
        ids = torch.full((n, width), self.pad_id(), dtype=torch.long)
        lab = torch.zeros((n, width))
        pos = torch.zeros((n, width), dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for k, (x, y, p) in enumerate(packed):
            ids[k, : len(x)], lab[k, : len(y)], pos[k, : len(p)] = (
                torch.tensor(x),
                torch.tensor(y).float(),
                torch.tensor(p),
            )
            attn[k, : len(x)] = 1
        ids, lab, pos, attn = (t.to(self.device) for t in (ids, lab, pos, attn))
        mask = lab[:, 1:]
        with self.policy.autocast():
            scores = score_packed(self.model, ids, attn, pos, lab, self.fused(mask, norm))
        return scores, mask

    def eval_metrics(self, out: dict[str, float]) -> dict[str, float]:
        out.pop("eval/loss/sft", None)  # the same number as eval/loss
        return out


class PairsFeed(Feed):
    """DPO, IPO: the policy's and the frozen reference's sequence log-probs of chosen and rejected.

    The reference is the starting policy; the DPO family keeps dropout off, as TRL does.
    """

    inputs = "pairs"
    data_kind = "pairs"

    def __init__(
        self,
        policy: Any,
        loss: Resolved,
        *,
        max_len: int,
        precompute_ref: bool = False,
        ref_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(policy, loss, max_len=max_len)
        self.precompute_ref = precompute_ref
        self.ref: Policy | None = policy.frozen_copy(ref_dtype)
        self.ref_logps: Tensor | None = None  # [N, 2] precomputed (chosen, rejected)
        self.eval_ref_logps: Tensor | None = None

    def sequence_logps(self, model: Policy, data: Encoded, rows: list[int]) -> tuple[Tensor, Tensor]:
        """Sequence log-probs of the chosen and rejected answers ``[B], [B]`` in one forward pass."""
        prompts = [data.prompts[i] for i in rows]
        comps = [data.first[i] for i in rows] + [data.second[i] for i in rows]
        p_ids, p_mask, c_ids, c_mask = pad_batch(prompts + prompts, comps, self.pad_id(), self.device)
        seq = masked_sum(model.score(p_ids, p_mask, c_ids, c_mask).logp, c_mask, dim=-1)
        return seq[: len(rows)], seq[len(rows) :]

    def prepare(self, data: Encoded, eval_data: Encoded | None, size: int, show: bool) -> None:
        if not self.precompute_ref:
            return
        self.ref_logps = self._precompute(data, "train", size, show)
        if eval_data is not None:
            self.eval_ref_logps = self._precompute(eval_data, "eval", size, show)
        self.ref = None  # no longer needed: free its memory

    @torch.no_grad()
    def _precompute(self, data: Encoded, label: str, size: int, show: bool) -> Tensor:
        assert self.ref is not None
        out = torch.zeros(len(data), 2)
        with LiveProgress(math.ceil(len(data) / size), f"ref log-probs ({label})", show) as bar:
            for k, start in enumerate(range(0, len(data), size)):
                rows = list(range(start, min(start + size, len(data))))
                c, r = self.sequence_logps(self.ref, data, rows)
                out[rows, 0], out[rows, 1] = c.float().cpu(), r.float().cpu()
                bar.update(k + 1, {})
        return out

    def reference_cache(self, held_out: bool) -> Tensor | None:
        return self.eval_ref_logps if held_out else self.ref_logps

    def ref_pair_logps(self, data: Encoded, rows: list[int], cache: Tensor | None) -> tuple[Tensor, Tensor]:
        """Reference log-probs: from the precomputed table, or computed now under no_grad."""
        if cache is not None:
            pick = cache[rows].to(self.device)
            return pick[:, 0], pick[:, 1]
        assert self.ref is not None
        with torch.no_grad():
            return self.sequence_logps(self.ref, data, rows)

    def loss_data(self, data: Encoded, rows: list[int]) -> dict[str, Tensor]:
        """Keyword-only data of the loss beyond the four log-probs (none for plain pairs)."""
        return {}

    def micro_loss(
        self, data: Items, rows: list[int], cache: Tensor | None, norm: float
    ) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(data, Encoded)
        lc, ll = self.sequence_logps(self.policy, data, rows)
        refc, refl = self.ref_pair_logps(data, rows, cache)
        per_pair, m = self.loss(lc, ll, refc, refl, **self.loss_data(data, rows))
        loss = per_pair.sum() / norm
        m = {**m, "logps/chosen": lc.detach().sum(), "logps/rejected": ll.detach().sum()}
        return loss, per_norm(m, norm)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref.model.state_dict() if self.ref is not None else None,
            "ref_logps": self.ref_logps,
            "eval_ref_logps": self.eval_ref_logps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ref is not None and state.get("ref") is not None:
            self.ref.model.load_state_dict(state["ref"])
        if state.get("ref_logps") is not None:
            self.ref_logps = state["ref_logps"]
        if state.get("eval_ref_logps") is not None:
            self.eval_ref_logps = state["eval_ref_logps"]


class ScoredPairsFeed(PairsFeed):
    """SPO: pairs whose rows carry real-valued scores, passed to the loss as keyword-only data."""

    inputs = "scored_pairs"
    data_kind = "scored_pairs"

    def loss_data(self, data: Encoded, rows: list[int]) -> dict[str, Tensor]:
        assert data.scores is not None
        sc = data.scores[rows].to(self.device)
        return {"score_chosen": sc[:, 0], "score_rejected": sc[:, 1]}


class RewardPairsFeed(Feed):
    """Reward models: the scalar score at the last real token of chosen and rejected (one forward)."""

    inputs = "reward_pairs"
    data_kind = "pairs"
    train_mode = True
    evaluates_policy = False

    @classmethod
    def build_model(cls, ctx: LoopContext) -> tuple[Any, Policy]:
        from rlx.models import build_reward_model
        from rlx.tracking import console

        with console.status("building reward model", spinner="dots"):
            model, tokenizer = build_reward_model(ctx.plan.cfg["model"], ctx.plan.task)
            model.to(ctx.plan.device)
        from rlx.distributed import broadcast_module

        broadcast_module(model)  # h11: rank 0's initial weights on every rank
        return RewardModelHandle(model, tokenizer), Policy(model, tokenizer, ctx.plan.task, "reward_model")

    def rewards(self, data: Encoded, rows: list[int]) -> tuple[Tensor, Tensor]:
        """The reward model's scores of chosen and rejected (`encode_for_reward`, `reward_scores`)."""
        ex = [data.texts[i] for i in rows]
        ids, mask = encode_for_reward(
            self.policy.tokenizer,
            [e.prompt for e in ex] * 2,
            [e.chosen for e in ex] + [e.rejected for e in ex],
            max_length=self.max_len,
        )
        r = reward_scores(self.model, ids.to(self.device), mask.to(self.device))
        return r[: len(rows)], r[len(rows) :]

    def micro_loss(
        self, data: Items, rows: list[int], cache: Tensor | None, norm: float
    ) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(data, Encoded)
        per_pair, m = self.loss(*self.rewards(data, rows))
        return per_pair.sum() / norm, per_norm(m, norm)

    def eval_metrics(self, out: dict[str, float]) -> dict[str, float]:
        for old, new in (("eval/rm/accuracy", "eval/pair_accuracy"), ("eval/rm/margin", "eval/margin")):
            if old in out:  # rm_pairwise's metrics; another reward-model loss may log others
                out[new] = out.pop(old)
        return out


FEEDS: dict[str, type[Feed]] = {
    f.inputs: f for f in (CompletionsFeed, PairsFeed, ScoredPairsFeed, RewardPairsFeed)
}


def per_norm(metrics: dict[str, Any], norm: float) -> dict[str, Tensor | float]:
    """Each metric (a sum over the micro-batch's rows) divided by the batch's ``norm``, in float64 and
    still on the device: the value ``float(v) / norm`` gives, without reading it yet."""
    return {
        k: (v.detach().double() if isinstance(v, Tensor) else float(v)) / norm for k, v in metrics.items()
    }


def zero_weight_pass(feed: Feed, data: Items, rows: list[int], cache: Tensor | None, norm: float) -> bool:
    """fsdp2 (h11g): a forward and backward that change no gradient, for a rank with fewer micro-batches
    than another (every pass over a sharded model is a collective). One row (this rank's first, or the
    data's first when it has none) through the feed's own loss, multiplied by 0: the same parameters
    receive gradients, all exact zeros. Takes part in the real passes' agreement on finiteness; False
    when another rank's loss was not finite."""
    loss, _ = feed.micro_loss(data, rows[:1] or [0], cache, norm)
    zero = loss * 0.0
    # its own value does not count (a multiple of 0); it takes part in the real passes' agreement
    if not finite_everywhere(torch.zeros(()), feed.model):
        return False
    zero.backward()
    return True


def offline_step(
    feed: Feed,
    data: Items,
    rows: list[int],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    grad_clip: float | None,
    guard: Any,
    step: int,
    micro_batch_size: int | None,
    cache: Tensor | None = None,
) -> dict[str, float]:
    """One optimizer step on ``rows`` of ``data``: the batch's loss over micro-batches, backward, and
    `optimizer_step`. Returns the step's metrics (``loss/total``, the loss's own metrics as batch
    means, ``grad_norm`` before clipping, ``lr`` of this step); only ``nonfinite/skipped`` when
    ``trainer.on_nonfinite=skip`` dropped the update (``guard`` is the run's `NonFiniteGuard`)."""
    feed.model.train(feed.train_mode)
    # h11: ``rows`` are this rank's share of the batch; the normaliser is the whole batch's (all ranks)
    norm = max(all_reduce_sum(feed.norm(data, rows)), 1.0)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)
    total = 0.0
    bad: tuple[float, str] | None = None
    try:
        parts = list(chunks(rows, micro_batch_size)) if rows else []
        # fsdp2: every rank runs as many passes as the rank with the most micro-batches (h11g: an
        # epoch's last, smaller batch leaves some ranks fewer rows, or none)
        for k in range(passes_everywhere(len(parts), feed.model)):
            if k >= len(parts):  # a pass that adds nothing (`zero_weight_pass`)
                if not zero_weight_pass(feed, data, rows, cache, norm):
                    break
                continue
            part = parts[k]
            loss, metrics = feed.micro_loss(data, part, cache, norm)
            read = host_floats({**metrics, "loss": loss})  # one transfer, before the backward
            everywhere = finite_everywhere(loss, feed.model)  # h11f: fsdp2 agrees before backward
            if not math.isfinite(read["loss"]):
                bad = (read["loss"], "loss")
                break
            if not everywhere:  # another rank's loss is not finite: stop here too (agreed below)
                break
            loss.backward()
            total += read["loss"]
            for k in metrics:
                sums[k] += read[k]
        if not guard.agreed_ok(bad, "loss", step):  # on_nonfinite=skip: drop this update (every rank)
            optimizer.zero_grad(set_to_none=True)
            return {"nonfinite/skipped": float(guard.skipped)}
        total = all_reduce_sum(total)  # h11: shares of the batch's loss and metrics, summed
        sums = defaultdict(float, all_reduce_dict(sums, keys=union_keys(sums)))
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = optimizer_step([(optimizer, scheduler)], grad_clip=grad_clip, guard=guard, step=step)
    finally:
        feed.model.eval()
    if grad_norm is None:
        return {"nonfinite/skipped": float(guard.skipped)}
    return {
        "loss/total": total,
        **sums,
        "grad_norm": grad_norm,
        "lr": lr,
        "nonfinite/skipped": float(guard.skipped),
    }
