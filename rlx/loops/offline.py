"""The offline loop: SFT, reward-model training, DPO, IPO and SPO are presets of this one loop.

    read the dataset (data.train) once; tokenise; report skipped and truncated rows
    (DPO family) freeze pi_ref = the starting policy; optionally precompute ref log-probs for the data
    for epoch in 1..algo.epochs (or until trainer.steps optimizer steps):
        for batch of algo.batch_size rows, in a seeded shuffled order:
            (split into micro-batches for memory; every loss is normalised by the whole batch's counts)
            SFT: -logp of completion tokens, token_mean            (sft_nll)
            RM:  r = reward model at the last real token; -log sigmoid(r_c - r_l - margin)
            DPO/IPO/SPO: sequence log-probs of chosen and rejected in one forward, ref log-probs
                 under no_grad (or precomputed), the pair loss
            backward, clip grad norm, optimizer step
        log metrics; evaluate every trainer.eval_every (held-out data, and the task's held-out set)

Which family runs is decided by the loss (``algo.loss.name``): each registered offline loss says
what it consumes (`rlx.losses.preference`). The data position (epoch, index into the epoch's order,
shuffle seed) is part of the trainer state, so a resumed run sees the same batches.

Log-probs here are of the untempered policy (temperature 1): the offline losses are likelihoods of
given text, and DPO's implicit reward is defined on the model's own distribution.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from rlx.data import Example, read_examples
from rlx.errors import RlxError, require
from rlx.evaluate import evaluate
from rlx.loops import LOOPS, LoopContext
from rlx.loops import chunks as _chunks
from rlx.losses.aggregation import token_mean
from rlx.losses.preference import PREFERENCE_LOSSES
from rlx.masked import masked_sum
from rlx.models import Policy, Sampling, token_logp
from rlx.models.reward_model import encode_for_reward, reward_scores
from rlx.registry import Resolved, check_type
from rlx.rewards import REWARDS
from rlx.runtime import dist_rank
from rlx.tasks import Task
from rlx.tracking import LiveProgress, Tracker, console

# what each loss family reads from the data
DATA_KIND = {"token_logp": "sft", "pair_logp": "pairs", "pair_reward": "pairs"}

ALGO_TYPES: dict[str, Any] = {
    "name": str,
    "loop": str,
    "epochs": int,
    "batch_size": int,
    "max_prompt_len": int,
    "max_completion_len": int,
    "packing": bool,
    "append_eos": bool,
    "precompute_ref": bool,
    "task_eval": bool,
}
DATA_TYPES: dict[str, Any] = {
    "train": str,
    "eval": str | None,
    "split": str,
    "eval_split": str,
    "format": str,
    "limit": int | None,
    "eval_limit": int | None,
}


@dataclass
class OfflineSettings:
    family: str  # "sft" | "rm" | "preference"
    data_kind: str  # "sft" | "pairs" | "scored_pairs"
    train: str
    eval: str | None
    split: str
    eval_split: str
    fmt: str
    columns: dict[str, Any]
    limit: int | None
    eval_limit: int | None
    epochs: int
    batch_size: int
    max_steps: int  # 0 = algo.epochs passes over the data
    micro_batch_size: int | None
    max_prompt_len: int
    max_completion_len: int
    packing: bool
    append_eos: bool
    precompute_ref: bool
    grad_clip: float | None
    eval_every: int
    save_every: int
    seed: int
    task_eval: bool
    eval_greedy: bool
    eval_batch_size: int
    sampling: Sampling


@dataclass
class OfflinePlan:
    settings: OfflineSettings
    loss: Resolved
    reward: Resolved | None  # the task's reward, for the held-out task evaluation of a policy


def _local_missing(source: str) -> bool:
    p = Path(source).expanduser()
    local = p.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv") or source.startswith((".", "/", "~"))
    return local and not p.exists()


def plan_offline(c: dict[str, Any], task: Task) -> OfflinePlan:
    """Check the offline loop's settings and bind its loss; reads no data and builds no model."""
    t, a = c["trainer"], c["algo"]
    d = c.get("data") or {}
    for key, kind in ALGO_TYPES.items():
        if key in a:
            check_type(f"algo.{key}", a[key], kind)
    for key, kind in DATA_TYPES.items():
        if key in d:
            check_type(f"data.{key}", d[key], kind)
    name = a["name"]
    require("loss" in a and a["loss"], f"algo={name} (offline loop) needs algo.loss")
    loss = PREFERENCE_LOSSES.resolve(a["loss"], where="algo.loss")
    inputs = loss.entry.meta["inputs"]
    family = {"token_logp": "sft", "pair_reward": "rm", "pair_logp": "preference"}[inputs]
    data_kind = DATA_KIND[inputs]
    if "score_chosen" in inspect.signature(loss.entry.fn).parameters:
        data_kind = "scored_pairs"
    train = d.get("train")
    require(
        train not in (None, "", "???"),
        f"algo={name} needs data.train=FILE ({data_kind} rows; `rlx data sort --out DIR` writes examples)",
    )
    for key in ("train", "eval"):
        if d.get(key) and _local_missing(str(d[key])):
            raise RlxError(f"data.{key}={d[key]}: no such file")
    require(a["epochs"] >= 1, f"algo.epochs must be >= 1, got {a['epochs']}")
    require(a["batch_size"] >= 1, f"algo.batch_size must be >= 1, got {a['batch_size']}")
    require(a["max_prompt_len"] >= 1, f"algo.max_prompt_len must be >= 1, got {a['max_prompt_len']}")
    require(
        a["max_completion_len"] >= 1, f"algo.max_completion_len must be >= 1, got {a['max_completion_len']}"
    )
    require(not a.get("packing") or family == "sft", "algo.packing is for algo=sft only")
    mbs = t["micro_batch_size"]
    require(mbs is None or mbs >= 1, f"trainer.micro_batch_size must be >= 1 or null, got {mbs}")
    fmt = str(d.get("format") or "auto")
    require(fmt in ("auto", "trl", "dolly"), f"data.format={fmt!r}; one of auto, trl, dolly")
    columns = dict(d.get("columns") or {})
    task_eval = bool(a.get("task_eval", True)) and family != "rm" and getattr(task, "has_ground_truth", True)
    reward = REWARDS.resolve(c["reward"], where="reward") if task_eval else None
    r = c["rollout"]
    settings = OfflineSettings(
        family=family,
        data_kind=data_kind,
        train=str(train),
        eval=str(d["eval"]) if d.get("eval") else None,
        split=str(d.get("split") or "train"),
        eval_split=str(d.get("eval_split") or "test"),
        fmt=fmt,
        columns=columns,
        limit=d.get("limit"),
        eval_limit=d.get("eval_limit"),
        epochs=int(a["epochs"]),
        batch_size=int(a["batch_size"]),
        max_steps=int(t["steps"]),
        micro_batch_size=mbs,
        max_prompt_len=int(a["max_prompt_len"]),
        max_completion_len=int(a["max_completion_len"]),
        packing=bool(a.get("packing", False)),
        append_eos=bool(a.get("append_eos", True)),
        precompute_ref=bool(a.get("precompute_ref", False)),
        grad_clip=t["grad_clip"],
        eval_every=int(t["eval_every"] or 0),
        save_every=int(t["save_every"] or 0),
        seed=int(t["seed"]),
        task_eval=task_eval,
        eval_greedy=bool(c["eval"]["greedy"]),
        eval_batch_size=int(c["eval"]["batch_size"]),
        sampling=Sampling(
            temperature=float(r["temperature"]),
            top_k=int(r["top_k"]),
            top_p=float(r["top_p"]),
            max_new_tokens=r["max_new_tokens"] or task.max_new_tokens,
        ),
    )
    return OfflinePlan(settings, loss, reward)


# --------------------------------------------------------------------------------------------------
# tokenised data
# --------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Tokenised rows: prompt ids and one (SFT) or two (pairs) completions per row, unpadded."""

    prompts: list[list[int]]
    first: list[list[int]]  # the completion (SFT) or the chosen answer
    second: list[list[int]] = field(default_factory=list)  # the rejected answer
    scores: Tensor | None = None  # [N, 2] score_chosen, score_rejected
    texts: list[Example] = field(default_factory=list)  # the rows (the reward model re-encodes text)
    counts: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def encode_rows(policy: Policy, rows: list[Example], s: OfflineSettings, kind: str) -> Encoded:
    """Tokenise prompts and completions as the policy reads them; truncate and count.

    Prompts keep their last ``max_prompt_len`` tokens (the end is what the answer follows),
    completions their first ``max_completion_len`` (EOS included when it fits): nothing is dropped.
    """
    prompts = policy.prompt_token_ids([r.prompt for r in rows])
    eos = [policy.eos_id] if s.append_eos and policy.eos_id is not None else []
    counts = {"data/rows": float(len(rows)), "data/truncated_prompts": 0.0, "data/truncated_completions": 0.0}

    def cut_prompt(ids: list[int]) -> list[int]:
        if len(ids) > s.max_prompt_len:
            counts["data/truncated_prompts"] += 1
            return ids[-s.max_prompt_len :]
        return ids

    def cut_completions(texts: list[str]) -> list[list[int]]:
        out = []
        for ids in policy.completion_token_ids(texts):
            ids = ids + eos
            if len(ids) > s.max_completion_len:
                counts["data/truncated_completions"] += 1
                ids = ids[: s.max_completion_len]
            out.append(ids)
        return out

    enc = Encoded(prompts=[cut_prompt(p) for p in prompts], first=[], texts=rows, counts=counts)
    if kind == "sft":
        enc.first = cut_completions([r.completion for r in rows])
    else:
        enc.first = cut_completions([r.chosen for r in rows])
        enc.second = cut_completions([r.rejected for r in rows])
        enc.scores = torch.tensor([[r.score_chosen, r.score_rejected] for r in rows], dtype=torch.float32)
    return enc


def pad_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Left-padded prompts and right-padded completions with their masks (what
    `Policy.completion_logits` takes)."""
    n, p_len, c_len = len(prompts), max(map(len, prompts)), max(max(map(len, completions)), 1)
    p_ids = torch.full((n, p_len), pad_id, dtype=torch.long)
    p_mask = torch.zeros((n, p_len), dtype=torch.long)
    c_ids = torch.full((n, c_len), pad_id, dtype=torch.long)
    c_mask = torch.zeros((n, c_len), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if p:
            p_ids[i, p_len - len(p) :] = torch.tensor(p)
            p_mask[i, p_len - len(p) :] = 1
        if c:
            c_ids[i, : len(c)] = torch.tensor(c)
            c_mask[i, : len(c)] = 1
    return p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device)


def pack_rows(enc: Encoded, length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy packing of prompt+completion examples into rows of at most ``length`` tokens.

    Each row is (ids, loss mask of the completion tokens, position ids restarting at each example).
    Hand-written because transformers' padding-free collator needs flash-attention: here attention is
    causal over the whole row, so an example can see the ones packed before it (TRL's classic
    packing); the position ids restart, and the loss still covers completion tokens only.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    lab: list[int] = []
    pos: list[int] = []
    for p, c in zip(enc.prompts, enc.first):
        ex = p + c
        if ids and len(ids) + len(ex) > length:
            rows.append((ids, lab, pos))
            ids, lab, pos = [], [], []
        ids += ex
        lab += [0] * len(p) + [1] * len(c)
        pos += list(range(len(ex)))
    if ids:
        rows.append((ids, lab, pos))
    return rows


# --------------------------------------------------------------------------------------------------
# the reward model being trained (algo=rm)
# --------------------------------------------------------------------------------------------------
class RewardModelHandle:
    """A sequence-classification reward model and its tokenizer; saves as a ``save_pretrained`` dir."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))


@LOOPS.register("offline", plan=plan_offline)
def build_offline(ctx: LoopContext) -> OfflineTrainer:
    """Read the data, build the policy (or reward model), its reference, optimizer and scheduler."""
    op: OfflinePlan = ctx.plan.settings
    s = op.settings
    c = ctx.plan.cfg
    if s.family == "rm":
        from rlx.models import build_reward_model

        with console.status("building reward model", spinner="dots"):
            model, tokenizer = build_reward_model(c["model"], ctx.plan.task)
            model.to(ctx.plan.device)
        policy: Any = RewardModelHandle(model, tokenizer)
        tok_policy = Policy(model, tokenizer, ctx.plan.task, "reward_model")
    else:
        policy = ctx.build_policy()
        tok_policy = policy
    with console.status(f"reading {s.train}", spinner="dots"):
        rows, report = read_examples(
            s.train, s.data_kind, fmt=s.fmt, columns=s.columns, split=s.split, limit=s.limit
        )
        enc = encode_rows(tok_policy, rows, s, s.data_kind)
        enc.counts["data/skipped_identical"] = float(report.skipped_identical)
        eval_enc = None
        if s.eval:
            eval_rows, eval_report = read_examples(
                s.eval,
                s.data_kind,
                fmt=s.fmt,
                columns=s.columns,
                split=s.eval_split,
                limit=s.eval_limit,
                where="data.eval",
            )
            eval_enc = encode_rows(tok_policy, eval_rows, s, s.data_kind)
            eval_enc.counts["data/skipped_identical"] = float(eval_report.skipped_identical)
    for label, e in (("train", enc), ("eval", eval_enc)):
        if e is not None and (e.counts["data/truncated_prompts"] or e.counts["data/truncated_completions"]):
            warnings.warn(
                f"data.{label}: truncated {int(e.counts['data/truncated_prompts'])} prompt(s) to "
                f"algo.max_prompt_len={s.max_prompt_len} and {int(e.counts['data/truncated_completions'])} "
                f"completion(s) to algo.max_completion_len={s.max_completion_len} (counted in data/*)",
                RuntimeWarning,
                stacklevel=2,
            )
    items = len(pack_rows(enc, s.max_prompt_len + s.max_completion_len)) if s.packing else len(enc)
    per_epoch = math.ceil(items / s.batch_size)
    total = s.max_steps if s.max_steps > 0 else s.epochs * per_epoch
    optimizer, scheduler = ctx.make_optimizer(policy.parameters(), total)
    return OfflineTrainer(
        ctx=ctx,
        policy=policy,
        optimizer=optimizer,
        scheduler=scheduler,
        data=enc,
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
    """SFT / RM / DPO / IPO / SPO over a fixed dataset."""

    def __init__(
        self,
        *,
        ctx: LoopContext,
        policy: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        data: Encoded,
        eval_data: Encoded | None,
        total_steps: int,
    ) -> None:
        op: OfflinePlan = ctx.plan.settings
        self.ctx = ctx
        self.s = op.settings
        self.loss = op.loss
        self.reward = op.reward
        self.task = ctx.plan.task
        self.policy = policy
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.tracker: Tracker = ctx.tracker
        self.data = data
        self.eval_data = eval_data
        self.total_steps = total_steps
        self.rank, self.world_size = dist_rank()
        self.step = 0
        self.epoch = 0
        self.index = 0  # position in the current epoch's order
        self.shuffle_seed = self.s.seed
        self.packed = (
            pack_rows(data, self.s.max_prompt_len + self.s.max_completion_len) if self.s.packing else []
        )
        self.ref: Policy | None = None
        self.ref_logps: Tensor | None = None  # [N, 2] precomputed (chosen, rejected)
        self.eval_ref_logps: Tensor | None = None
        if self.s.family == "preference":
            self.ref = copy.copy(policy)
            self.ref.model = copy.deepcopy(policy.model).requires_grad_(False).eval()
            if self.s.precompute_ref:
                self.ref_logps = self._precompute(self.data, "train")
                if eval_data is not None:
                    self.eval_ref_logps = self._precompute(eval_data, "eval")
                self.ref = None  # no longer needed: free its memory
        # SFT and reward models train in train mode (dropout as configured, e.g. LoRA dropout); the
        # DPO family compares log-probs with a frozen copy and keeps dropout off, as TRL does.
        self._train_mode = self.s.family in ("sft", "rm")

    @property
    def num_items(self) -> int:
        return len(self.packed) if self.s.packing else len(self.data)

    # -- state for checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step, data position (epoch, index, shuffle seed) and the frozen reference (or its
        precomputed log-probs)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "index": self.index,
            "shuffle_seed": self.shuffle_seed,
            "ref": self.ref.model.state_dict() if self.ref is not None else None,
            "ref_logps": self.ref_logps,
            "eval_ref_logps": self.eval_ref_logps,
            "nonfinite": self.ctx.nonfinite.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.shuffle_seed = int(state["shuffle_seed"])
        self.ctx.nonfinite.load_state_dict(state["nonfinite"])
        if self.ref is not None and state.get("ref") is not None:
            self.ref.model.load_state_dict(state["ref"])
        if state.get("ref_logps") is not None:
            self.ref_logps = state["ref_logps"]
        if state.get("eval_ref_logps") is not None:
            self.eval_ref_logps = state["eval_ref_logps"]

    # -- data order ----------------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        """The epoch's shuffled order: a pure function of (shuffle seed, epoch)."""
        g = torch.Generator().manual_seed(self.shuffle_seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def next_batch(self) -> list[int]:
        if self.index >= self.num_items:
            self.epoch += 1
            self.index = 0
        rows = self.order(self.epoch)[self.index : self.index + self.s.batch_size]
        self.index += len(rows)
        return rows

    # -- forward passes ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.policy.device

    def _pad_id(self) -> int:
        tok = self.policy.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    def sequence_logps(self, model: Policy, data: Encoded, rows: list[int]) -> tuple[Tensor, Tensor]:
        """Sequence log-probs of the chosen and rejected answers ``[B], [B]`` in one forward pass."""
        prompts = [data.prompts[i] for i in rows]
        comps = [data.first[i] for i in rows] + [data.second[i] for i in rows]
        p_ids, p_mask, c_ids, c_mask = pad_batch(prompts + prompts, comps, self._pad_id(), self.device)
        logits = model.completion_logits(p_ids, p_mask, c_ids, c_mask)
        seq = masked_sum(token_logp(logits, c_ids), c_mask, dim=-1)
        return seq[: len(rows)], seq[len(rows) :]

    @torch.no_grad()
    def _precompute(self, data: Encoded, label: str) -> Tensor:
        assert self.ref is not None
        out = torch.zeros(len(data), 2)
        size = self.s.micro_batch_size or self.s.batch_size
        with LiveProgress(
            math.ceil(len(data) / size), f"ref log-probs ({label})", self.tracker.enabled
        ) as bar:
            for k, start in enumerate(range(0, len(data), size)):
                rows = list(range(start, min(start + size, len(data))))
                c, r = self.sequence_logps(self.ref, data, rows)
                out[rows, 0], out[rows, 1] = c.float().cpu(), r.float().cpu()
                bar.update(k + 1, {})
        return out

    def ref_pair_logps(self, data: Encoded, rows: list[int], cache: Tensor | None) -> tuple[Tensor, Tensor]:
        """Reference log-probs: from the precomputed table, or computed now under no_grad."""
        if cache is not None:
            pick = cache[rows].to(self.device)
            return pick[:, 0], pick[:, 1]
        assert self.ref is not None
        with torch.no_grad():
            return self.sequence_logps(self.ref, data, rows)

    def rm_rewards(self, data: Encoded, rows: list[int]) -> tuple[Tensor, Tensor]:
        """The reward model's scores of chosen and rejected (one forward, `reward_scores`)."""
        ex = [data.texts[i] for i in rows]
        ids, mask = encode_for_reward(
            self.policy.tokenizer,
            [e.prompt for e in ex] * 2,
            [e.chosen for e in ex] + [e.rejected for e in ex],
            max_length=self.s.max_prompt_len + self.s.max_completion_len,
        )
        r = reward_scores(self.policy.model, ids.to(self.device), mask.to(self.device))
        return r[: len(rows)], r[len(rows) :]

    def micro_loss(
        self, data: Encoded, rows: list[int], cache: Tensor | None, norm: float
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss of ``rows`` normalised by the whole batch's count ``norm`` (pairs or tokens)."""
        metrics: dict[str, float] = {}
        if self.s.family == "sft":
            if self.s.packing:
                logp, mask = self._packed_logp(rows)
            else:
                p_ids, p_mask, c_ids, c_mask = pad_batch(
                    [data.prompts[i] for i in rows],
                    [data.first[i] for i in rows],
                    self._pad_id(),
                    self.device,
                )
                logp = token_logp(self.policy.completion_logits(p_ids, p_mask, c_ids, c_mask), c_ids)
                mask = c_mask
            per_token, _ = self.loss(logp, mask)
            loss = token_mean(per_token, mask, num_tokens=norm)
            metrics["loss/sft"] = loss.item()
            return loss, metrics
        if self.s.family == "rm":
            rc, rl = self.rm_rewards(data, rows)
            per_pair, m = self.loss(rc, rl)
        else:
            lc, ll = self.sequence_logps(self.policy, data, rows)
            refc, refl = self.ref_pair_logps(data, rows, cache)
            extra = {}
            if self.s.data_kind == "scored_pairs":
                assert data.scores is not None
                sc = data.scores[rows].to(self.device)
                extra = {"score_chosen": sc[:, 0], "score_rejected": sc[:, 1]}
            per_pair, m = self.loss(lc, ll, refc, refl, **extra)
            m = {**m, "logps/chosen": lc.detach().sum(), "logps/rejected": ll.detach().sum()}
        loss = per_pair.sum() / norm
        metrics.update({k: float(v) / norm for k, v in m.items()})
        return loss, metrics

    def _packed_logp(self, rows: list[int]) -> tuple[Tensor, Tensor]:
        width = max(len(self.packed[i][0]) for i in rows)
        n = len(rows)
        ids = torch.full((n, width), self._pad_id(), dtype=torch.long)
        lab = torch.zeros((n, width))
        pos = torch.zeros((n, width), dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for k, i in enumerate(rows):
            x, y, p = self.packed[i]
            ids[k, : len(x)], lab[k, : len(y)], pos[k, : len(p)] = (
                torch.tensor(x),
                torch.tensor(y).float(),
                torch.tensor(p),
            )
            attn[k, : len(x)] = 1
        ids, lab, pos, attn = (t.to(self.device) for t in (ids, lab, pos, attn))
        logits = self.policy.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        return token_logp(logits[:, :-1], ids[:, 1:]), lab[:, 1:]

    def _batch_norm(self, data: Encoded, rows: list[int]) -> float:
        if self.s.family != "sft":
            return float(len(rows))
        if self.s.packing:
            return float(sum(sum(self.packed[i][1][1:]) for i in rows))
        return float(sum(len(data.first[i]) for i in rows))

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self, rows: list[int]) -> dict[str, float]:
        self.policy.model.train(self._train_mode)
        norm = max(self._batch_norm(self.data, rows), 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        total = 0.0
        guard = self.ctx.nonfinite
        for part in _chunks(rows, self.s.micro_batch_size):
            loss, metrics = self.micro_loss(self.data, part, self.ref_logps, norm)
            if not guard.ok(loss, "loss", self.step):  # on_nonfinite=skip: drop this update
                self.optimizer.zero_grad(set_to_none=True)
                self.policy.model.eval()
                return {"nonfinite/skipped": float(guard.skipped)}
            loss.backward()
            total += loss.item()
            for k, v in metrics.items():
                sums[k] += v
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.s.grad_clip if self.s.grad_clip else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not guard.ok(grad_norm, "gradient norm", self.step):
            self.optimizer.zero_grad(set_to_none=True)
            self.policy.model.eval()
            return {"nonfinite/skipped": float(guard.skipped)}
        guard.update_done()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.policy.model.eval()
        return {
            "loss/total": total,
            **sums,
            "grad_norm": grad_norm,
            "lr": lr,
            "nonfinite/skipped": float(guard.skipped),
            "data/epoch": self.epoch + self.index / max(self.num_items, 1),
        }

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_data_metrics(self) -> dict[str, float]:
        """The loss and its metrics on the held-out data (``data.eval``)."""
        data = self.eval_data
        if data is None:
            return {}
        self.policy.model.eval()
        size = self.s.micro_batch_size or self.s.batch_size
        sums: dict[str, float] = defaultdict(float)
        total_norm = 0.0
        for start in range(0, len(data), size):
            rows = list(range(start, min(start + size, len(data))))
            norm = max(self._eval_norm(data, rows), 1.0)
            loss, metrics = self.micro_loss(data, rows, self.eval_ref_logps, norm)
            sums["loss"] += loss.item() * norm
            for k, v in metrics.items():
                sums[k] += v * norm
            total_norm += norm
        out = {f"eval/{k}": v / total_norm for k, v in sums.items() if k != "loss/sft"}
        if self.s.family == "rm":  # the names the README promises for reward models
            out["eval/pair_accuracy"] = out.pop("eval/rm/accuracy")
            out["eval/margin"] = out.pop("eval/rm/margin")
        return out

    def _eval_norm(self, data: Encoded, rows: list[int]) -> float:
        if self.s.family != "sft":
            return float(len(rows))
        return float(sum(len(data.first[i]) for i in rows))

    def evaluate(self) -> dict[str, float]:
        if self.s.packing:  # held-out data is scored unpacked
            packing, self.s.packing = True, False
        else:
            packing = False
        try:
            metrics = self.eval_data_metrics()
        finally:
            self.s.packing = packing
        if self.s.task_eval and self.reward is not None:
            task_metrics, _ = evaluate(
                self.policy,
                self.task,
                self.reward,
                self.s.sampling,
                greedy=self.s.eval_greedy,
                batch_size=self.s.eval_batch_size,
            )
            metrics.update(task_metrics)
        return metrics

    def run(self) -> None:
        if self.step == 0:
            counts = dict(self.data.counts)
            if self.eval_data is not None:
                counts.update({f"eval_{k}": v for k, v in self.eval_data.counts.items()})
            self.tracker.log_metrics(counts, step=0)
        with OfflineProgress(self.total_steps, "train", enabled=self.tracker.enabled) as bar:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                metrics = self.train_step(self.next_batch())
                metrics["time/update_s"] = time.perf_counter() - t0
                self.step += 1
                if self.s.eval_every and self.step % self.s.eval_every == 0 and self.step < self.total_steps:
                    metrics.update(self.evaluate())
                self.tracker.log_metrics(metrics, step=self.step)
                bar.update(self.step, metrics)
                self.ctx.step_done(self)
