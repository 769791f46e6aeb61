"""The offline loop: SFT, reward-model training, DPO, IPO and SPO are presets of this one loop.

    read the dataset (data.train) once; tokenise; report skipped and truncated rows
    (pairs) freeze pi_ref = the starting policy; optionally precompute ref log-probs for the data
    for epoch in 1..algo.epochs (or until trainer.steps optimizer steps):
        for batch of algo.batch_size rows, in a seeded shuffled order:
            (split into micro-batches for memory; every loss is normalised by the whole batch's counts)
            completions (SFT):  -logp of completion tokens, token_mean            (sft_nll)
            reward_pairs (RM):  r = reward model at the last real token; -log sigmoid(r_c - r_l - margin)
            pairs, scored_pairs (DPO/IPO/SPO): sequence log-probs of chosen and rejected in one
                 forward, ref log-probs under no_grad (or precomputed), the pair loss
            backward; rlx.loops.optim.optimizer_step (clip, non-finite guard, step, scheduler)
        log metrics; evaluate every trainer.eval_every (held-out data, and the task's held-out set)

What runs per row is decided once, by the inputs the loss declares (``algo.loss.name``, registered
in `rlx.losses.preference` with ``inputs=``): `rlx.loops.offline_feeds` has one `Feed` per kind and
the step function. Rows are encoded by `rlx.data.encode` (truncated to algo.max_prompt_len,
algo.max_completion_len and the model's context, counted in data/truncated_*). The data position
(epoch, index into the epoch's order, shuffle seed) is part of the trainer state, so a resumed run
sees the same batches.

Log-probs here are of the untempered policy (temperature 1): the offline losses are likelihoods of
given text, and DPO's implicit reward is defined on the model's own distribution.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlx import distributed
from rlx.data import DataSettings, read_examples
from rlx.data.encode import Encoded, encode_rows, pack_rows
from rlx.errors import require
from rlx.evaluate import evaluate, shard_bounds
from rlx.loops import LOOPS, LoopContext, Plan, host_floats
from rlx.loops.offline_feeds import FEEDS, Feed, Items, offline_step
from rlx.loops.online_settings import OnlineAlgoSettings
from rlx.losses.preference import PREFERENCE_LOSSES
from rlx.models import context_length
from rlx.registry import Resolved
from rlx.rewards import REWARDS
from rlx.runtime import memory_metrics
from rlx.settings import read_settings
from rlx.tracking import LiveProgress, Tracker, console

ONLINE_ALGO_KEYS = tuple(OnlineAlgoSettings.__dataclass_fields__)


@dataclass
class OfflineAlgoSettings:
    """``algo.*`` of the offline loop (defaults in conf/loop/offline.yaml, the loss in the preset)."""

    name: str
    loop: str
    loss: dict[str, Any]  # the offline loss (`rlx.losses.preference`) and its hyperparameters
    epochs: int
    batch_size: int
    max_prompt_len: int
    max_completion_len: int
    packing: bool
    append_eos: bool
    precompute_ref: bool
    task_eval: bool

    def check(self) -> None:
        require(self.epochs >= 1, f"algo.epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"algo.batch_size must be >= 1, got {self.batch_size}")
        require(self.max_prompt_len >= 1, f"algo.max_prompt_len must be >= 1, got {self.max_prompt_len}")
        require(
            self.max_completion_len >= 1,
            f"algo.max_completion_len must be >= 1, got {self.max_completion_len}",
        )


@dataclass
class OfflinePlan:
    algo: OfflineAlgoSettings
    data: DataSettings
    loss: Resolved
    feed: type[Feed]  # picked from the loss's declared inputs
    task_eval: bool
    reward: Resolved | None  # the task's reward, for the held-out task evaluation of a policy


def plan_offline(p: Plan) -> OfflinePlan:
    """Check the offline loop's settings and bind its loss; reads no data and builds no model."""
    # An experiment that spans both loops (experiment=rlhf_sort) may set the online loop's algo keys
    # for its RL stages; the offline stages leave them to it. Anything else unknown is refused.
    a = read_settings(OfflineAlgoSettings, p.cfg["algo"], where="algo", ignore=ONLINE_ALGO_KEYS)
    d = read_settings(DataSettings, p.cfg.get("data"), where="data")
    require(bool(a.loss), f"algo={a.name} (offline loop) needs algo.loss")
    loss = PREFERENCE_LOSSES.resolve(a.loss, where="algo.loss")
    feed = FEEDS[loss.entry.meta["inputs"]]
    require(
        d.has_train,
        f"algo={a.name} needs data.train=FILE ({feed.data_kind} rows; `rlx data sort --out DIR` writes "
        "examples)",
    )
    require(not a.packing or feed.packs, "algo.packing is for algo=sft only")
    task_eval = a.task_eval and feed.evaluates_policy and getattr(p.task, "has_ground_truth", True)
    reward = REWARDS.resolve(p.cfg["reward"], where="reward") if task_eval else None
    return OfflinePlan(a, d, loss, feed, task_eval, reward)


def read_data(
    d: DataSettings, a: OfflineAlgoSettings, kind: str, tokenizing: Any, context: int | None, held_out: bool
) -> Encoded:
    """data.train (or data.eval) read, checked and encoded; a truncation is said once."""
    source, split, limit = (d.eval, d.eval_split, d.eval_limit) if held_out else (d.train, d.split, d.limit)
    label = "eval" if held_out else "train"
    rows, report = read_examples(
        str(source), kind, fmt=d.format, columns=d.columns, split=split, limit=limit, where=f"data.{label}"
    )
    enc = encode_rows(
        tokenizing,
        rows,
        kind,
        max_prompt_len=a.max_prompt_len,
        max_completion_len=a.max_completion_len,
        append_eos=a.append_eos,
        context=context,
    )
    enc.counts["data/skipped_identical"] = float(report.skipped_identical)
    prompts, completions = enc.counts["data/truncated_prompts"], enc.counts["data/truncated_completions"]
    if prompts or completions:
        limits = f"algo.max_prompt_len={a.max_prompt_len}, algo.max_completion_len={a.max_completion_len}"
        if enc.cut_to_context:
            limits += f"; {enc.cut_to_context} row(s) cut to fit the model's context of {context} positions"
        warnings.warn(
            f"data.{label}: truncated {int(prompts)} prompt(s) and {int(completions)} completion(s) "
            f"({limits}); counted in data/*, never dropped",
            RuntimeWarning,
            stacklevel=2,
        )
    return enc


@LOOPS.register("offline", plan=plan_offline)
def build_offline(ctx: LoopContext) -> OfflineTrainer:
    """Read the data, build the policy (or reward model), its reference, optimizer and scheduler."""
    op: OfflinePlan = ctx.plan.settings
    a, d = op.algo, op.data
    policy, tokenizing = op.feed.build_model(ctx)
    context = context_length(tokenizing.model)
    max_len = a.max_prompt_len + a.max_completion_len
    if context is not None:
        max_len = min(max_len, context)
    with console.status(f"reading {d.train}", spinner="dots"):
        enc = read_data(d, a, op.feed.data_kind, tokenizing, context, held_out=False)
        eval_enc = read_data(d, a, op.feed.data_kind, tokenizing, context, held_out=True) if d.eval else None
    feed = op.feed(
        policy,
        op.loss,
        max_len=max_len,
        precompute_ref=a.precompute_ref,
        ref_dtype=ctx.plan.trainer.reference_torch_dtype,
    )
    items: Items = pack_rows(enc, max_len) if a.packing else enc
    per_epoch = math.ceil(len(items) / a.batch_size)
    steps = ctx.plan.trainer.steps
    total = steps if steps > 0 else a.epochs * per_epoch
    optimizer, scheduler = ctx.make_optimizer(policy.parameters(), total)
    return OfflineTrainer(
        ctx=ctx,
        feed=feed,
        optimizer=optimizer,
        scheduler=scheduler,
        data=enc,
        items=items,
        eval_data=eval_enc,
        total_steps=total,
    )


class OfflineProgress(LiveProgress):
    """The progress bar with the offline loop's key metrics."""

    KEYS: ClassVar[dict[str, str]] = {
        "loss/total": "loss",
        "rewards/accuracy": "acc",
        "rm/accuracy": "acc",
        "eval/exact": "eval_exact",
        "eval/pair_accuracy": "eval_acc",
        "eval/rewards/accuracy": "eval_acc",
    }


class OfflineTrainer:
    """SFT / RM / DPO / IPO / SPO over a fixed dataset: data order, steps, evaluation, state."""

    def __init__(
        self,
        *,
        ctx: LoopContext,
        feed: Feed,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        data: Encoded,
        items: Items,
        eval_data: Encoded | None,
        total_steps: int,
    ) -> None:
        op: OfflinePlan = ctx.plan.settings
        self.ctx = ctx
        self.algo = op.algo
        self.t = ctx.plan.trainer
        self.reward = op.reward
        self.task_eval = op.task_eval
        self.task = ctx.plan.task
        self.feed = feed
        self.policy = feed.policy
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.tracker: Tracker = ctx.tracker
        self.data = data
        self.items = items  # what batches index: the encoded rows, or packed rows (algo.packing)
        self.eval_data = eval_data
        self.total_steps = total_steps
        self.rank, self.world_size = distributed.world()
        self.step = 0
        self.epoch = 0
        self.index = 0  # position in the current epoch's order
        self.shuffle_seed = self.t.seed
        feed.prepare(data, eval_data, self.t.micro_batch_size or self.algo.batch_size, self.tracker.enabled)

    @property
    def packed(self) -> list[Any]:
        """The packed rows (algo.packing), else []."""
        return [] if isinstance(self.items, Encoded) else self.items

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def device(self) -> torch.device:
        return self.feed.device

    # -- state for checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step, data position (epoch, index, shuffle seed) and the frozen reference (or its
        precomputed log-probs)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "index": self.index,
            "shuffle_seed": self.shuffle_seed,
            **self.feed.state_dict(),
            "nonfinite": self.ctx.nonfinite.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.shuffle_seed = int(state["shuffle_seed"])
        self.ctx.nonfinite.load_state_dict(state["nonfinite"])
        self.feed.load_state_dict(state)

    # -- data order ----------------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        """The epoch's shuffled order: a pure function of (shuffle seed, epoch)."""
        g = torch.Generator().manual_seed(self.shuffle_seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def next_batch(self) -> list[int]:
        if self.index >= self.num_items:
            self.epoch += 1
            self.index = 0
        rows = self.order(self.epoch)[self.index : self.index + self.algo.batch_size]
        self.index += len(rows)
        return rows

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self, rows: list[int]) -> dict[str, float]:
        """One optimizer step on the batch ``rows``; each rank computes its contiguous share (h11)."""
        share = -(-len(rows) // self.world_size)
        metrics = offline_step(
            self.feed,
            self.items,
            rows[self.rank * share : (self.rank + 1) * share],
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            grad_clip=self.t.grad_clip,
            guard=self.ctx.nonfinite,
            step=self.step,
            micro_batch_size=self.t.micro_batch_size,
            cache=self.feed.reference_cache(held_out=False),
        )
        if "loss/total" in metrics:
            metrics["data/epoch"] = self.epoch + self.index / max(self.num_items, 1)
        return metrics

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_data_metrics(self) -> dict[str, float]:
        """The loss and its metrics on the held-out data (``data.eval``, never packed).

        h11: sharded under torchrun: each rank scores its contiguous share of the rows, and the sums
        (each metric times its micro-batch's normaliser, and the normalisers) are summed over ranks, so
        the result is the whole held-out set's, up to float rounding (another grouping into micro-batches)."""
        data = self.eval_data
        if data is None:
            return {}
        self.feed.model.eval()
        cache = self.feed.reference_cache(held_out=True)
        size = self.t.micro_batch_size or self.algo.batch_size
        sums: dict[str, float] = defaultdict(float)
        total_norm = 0.0
        lo, hi = shard_bounds(len(data), self.rank, self.world_size)
        with distributed.FullParameters(self.feed.model):  # fsdp2: no collective per forward (h11f)
            for start in range(lo, hi, size):
                rows = list(range(start, min(start + size, hi)))
                norm = max(self.feed.norm(data, rows), 1.0)
                loss, metrics = self.feed.micro_loss(data, rows, cache, norm)
                read = host_floats({**metrics, "loss": loss})
                sums["loss"] += read["loss"] * norm
                for k in metrics:
                    sums[k] += read[k] * norm
                total_norm += norm
        totals = distributed.all_reduce_dict(
            {**sums, "__norm__": total_norm}, keys=[*distributed.union_keys(sums), "__norm__"]
        )
        total_norm = totals.pop("__norm__")
        return self.feed.eval_metrics({f"eval/{k}": v / total_norm for k, v in totals.items()})

    def evaluate(self) -> dict[str, float]:
        """h11: every rank calls it; both evaluations are sharded over the ranks (each scores its share)."""
        metrics = self.eval_data_metrics()
        if self.task_eval and self.reward is not None:
            task_metrics, _ = evaluate(
                self.policy,
                self.task,
                self.reward,
                self.ctx.plan.sampling(),
                greedy=self.ctx.plan.eval.greedy,
                batch_size=self.ctx.plan.eval.batch_size,
            )
            metrics.update(task_metrics)
        return metrics

    def run(self) -> None:
        if self.step == 0:
            counts = dict(self.data.counts)
            if self.eval_data is not None:
                counts.update({f"eval_{k}": v for k, v in self.eval_data.counts.items()})
            self.tracker.log_metrics(counts, step=0)
        eval_every = self.t.eval_every
        with OfflineProgress(self.total_steps, "train", enabled=self.tracker.enabled) as bar:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                metrics = self.train_step(self.next_batch())
                metrics["time/update_s"] = time.perf_counter() - t0
                self.step += 1
                if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                    metrics.update(self.evaluate())
                metrics.update(memory_metrics(self.device))
                self.tracker.log_metrics(metrics, step=self.step)
                bar.update(self.step, metrics)
                self.ctx.step_done(self)
