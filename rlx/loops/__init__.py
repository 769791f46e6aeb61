"""Training loops, one registry entry each: ``algo.loop`` picks one (``online`` by default).

A loop module registers a builder with ``@LOOPS.register(name, plan=plan_fn)``:

- ``plan_fn(cfg: dict, task) -> settings`` checks the loop's own settings and binds its pluggable
  pieces, raising `RlxError` on bad input. It builds no model: `rlx.train.plan` runs it for every job
  of a sweep before the first one starts.
- ``builder(ctx: LoopContext) -> Trainer`` builds the models, optimizer and the trainer.

After each iteration a loop calls ``ctx.step_done(trainer)``: it saves a checkpoint every
``trainer.save_every`` iterations and, when SIGINT/SIGTERM arrived during the step, saves one and
raises `StopRequested`. Updates check their loss and gradient norm with ``ctx.nonfinite`` (a
`NonFiniteGuard`): ``trainer.on_nonfinite=stop`` raises, ``skip`` drops that update.

A `Trainer` carries everything the next step depends on beyond the saved model, optimizer,
scheduler and RNG states in ``state_dict()`` (plain tensors and Python values only, so that a
checkpoint loads with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch.optim.optimizer import ParamsT

from rlx.errors import NonFiniteError, RlxError, StopRequested, require
from rlx.registry import Registry
from rlx.startup import import_transformers_without_peft

import_transformers_without_peft()  # h12: before rlx.loops.optim imports transformers' schedulers

if TYPE_CHECKING:
    from rlx.models import Policy, Sampling
    from rlx.tasks import Task
    from rlx.tracking import Tracker

LOOPS = Registry("training loop", ["rlx.loops"])


@dataclass
class TrainerSettings:
    """``trainer.*``: what every loop shares (defaults in conf/train.yaml)."""

    device: str
    seed: int
    steps: int
    prompts_per_step: int
    group_size: int
    lr: float
    lr_schedule: str
    warmup_ratio: float
    min_lr_ratio: float
    grad_clip: float | None
    micro_batch_size: int | None
    eval_every: int
    save_every: int
    keep_checkpoints: int
    samples_every: int
    resume: str | None
    on_nonfinite: str
    max_nonfinite: int
    threads: int | str = "auto"  # h12: torch's CPU threads (rlx.train.apply_threads)
    parallel: str = "auto"  # h11: auto | none | ddp | fsdp2 (rlx.distributed)
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights): Policy.autocast
    reference_dtype: str = "fp32"  # fp32 | bf16: the frozen reference's weights (Policy.frozen_copy)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The policy's autocast dtype under ``trainer.precision`` (None: float32 throughout)."""
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def reference_torch_dtype(self) -> torch.dtype | None:
        """The frozen reference model's weight dtype (None: the policy's, float32)."""
        return torch.bfloat16 if self.reference_dtype == "bf16" else None

    def check(self) -> None:
        from transformers import SchedulerType

        require(self.steps >= 0, f"trainer.steps must be >= 0, got {self.steps}")
        require(
            self.prompts_per_step >= 1, f"trainer.prompts_per_step must be >= 1, got {self.prompts_per_step}"
        )
        require(self.group_size >= 1, f"trainer.group_size must be >= 1, got {self.group_size}")
        require(self.lr > 0, f"trainer.lr must be positive, got {self.lr}")
        require(math.isfinite(self.lr), f"trainer.lr must be finite, got {self.lr}")
        require(
            0 <= self.warmup_ratio < 1, f"trainer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}"
        )
        require(
            0 <= self.min_lr_ratio <= 1, f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
        )
        schedules = [s.value for s in SchedulerType]
        require(
            self.lr_schedule in schedules, f"trainer.lr_schedule={self.lr_schedule!r}; one of {schedules}"
        )
        require(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip must be positive or null")
        mbs = self.micro_batch_size
        require(mbs is None or mbs >= 1, f"trainer.micro_batch_size must be >= 1 or null, got {mbs}")
        require(self.eval_every >= 0, f"trainer.eval_every must be >= 0, got {self.eval_every}")
        require(self.save_every >= 0, f"trainer.save_every must be >= 0, got {self.save_every}")
        require(self.keep_checkpoints >= 0, "trainer.keep_checkpoints must be >= 0")
        require(self.samples_every >= 0, f"trainer.samples_every must be >= 0, got {self.samples_every}")
        NonFiniteGuard(self.on_nonfinite, self.max_nonfinite)  # checks both values
        require(  # h12
            self.threads == "auto" or (isinstance(self.threads, int) and 1 <= self.threads <= 4096),
            f"trainer.threads must be auto or a count from 1 to 4096, got {self.threads!r}",
        )
        from rlx.distributed import resolve_parallel

        resolve_parallel(self.parallel)  # h11: ddp or fsdp2 without torchrun, none under it: refused
        for key, value in (("precision", self.precision), ("reference_dtype", self.reference_dtype)):
            require(value in ("fp32", "bf16"), f"trainer.{key} must be fp32 or bf16, got {value!r}")


@dataclass
class RolloutSettings:
    """``rollout.*``: how completions are sampled (defaults in conf/train.yaml)."""

    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int | None
    # h11v: what samples (rlx/rollout/engines.py): hf | vllm; the vllm_* keys are read by vllm only
    engine: str = "hf"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_enable_sleep_mode: bool = False
    vllm_max_model_len: int | None = None

    def check(self) -> None:
        require(self.temperature > 0, f"rollout.temperature must be > 0, got {self.temperature}")
        require(self.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")
        require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        n = self.max_new_tokens
        require(n is None or n >= 1, f"rollout.max_new_tokens must be >= 1 or null (the task's), got {n}")
        from rlx.rollout.engines import check_engine

        check_engine(self.engine)  # h11v: a known name (vllm's own needs: `plan_online`)
        u = self.vllm_gpu_memory_utilization
        require(0 < u <= 1, f"rollout.vllm_gpu_memory_utilization must be in (0, 1], got {u}")
        m = self.vllm_max_model_len
        require(
            m is None or 1 <= m < 2**31,
            f"rollout.vllm_max_model_len must be in [1, 2**31) or null (the model's), got {m}",
        )


@dataclass
class EvalSettings:
    """``eval.*``: held-out evaluation (defaults in conf/train.yaml)."""

    greedy: bool
    batch_size: int

    def check(self) -> None:
        require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Plan:
    """A checked config: the task, the shared settings, the loop and its own settings (what the
    loop's plan function returned), the device."""

    cfg: dict[str, Any]
    task: Task
    trainer: TrainerSettings
    rollout: RolloutSettings
    eval: EvalSettings
    loop: str
    settings: Any
    device: torch.device

    def sampling(self) -> Sampling:
        """The sampling settings, with the task's answer length when rollout.max_new_tokens is null."""
        from rlx.models import Sampling

        r = self.rollout
        return Sampling(r.temperature, r.top_k, r.top_p, r.max_new_tokens or self.task.max_new_tokens)


Rows = TypeVar("Rows", bound=Sequence[Any] | torch.Tensor)


def chunks(rows: Rows, size: int | None) -> Iterator[Rows]:
    """Micro-batches of ``rows`` (row indices, a tensor or a list): at most ``size`` each, all at once
    when ``size`` is None."""
    if not size or size >= len(rows):
        yield rows
        return
    for start in range(0, len(rows), size):
        yield rows[start : start + size]  # type: ignore[misc]


def host_floats(figures: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """A micro-batch's figures (loss, metrics) as Python floats, the scalar tensors copied from their
    device in one transfer, where one ``.item()`` each would be a host sync each on a GPU (h12). Through
    float64, so each is the value ``.item()`` gives; Python numbers stay as they are."""
    tensors = {k: v for k, v in figures.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in figures.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([t.detach().reshape(()).to(device, torch.float64) for t in tensors.values()])
        out.update(zip(tensors, stacked.tolist(), strict=True))
    return out


class SavesItself(Protocol):
    def save(self, path: str | Path) -> None: ...


class Trainer(Protocol):
    """What `rlx.train` drives. ``policy`` is what ends up in ``final/`` (anything with ``save``)."""

    step: int
    policy: SavesItself
    optimizer: torch.optim.Optimizer | None  # None for a loop that steps by hand (algo=trpo)
    scheduler: Any

    def run(self) -> None: ...

    def evaluate(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteGuard:
    """What happens to a NaN or inf loss or gradient norm: ``stop`` (raise `NonFiniteError`) or
    ``skip`` (drop that optimizer update and count it; raise after ``max_in_row`` in a row).

    Checked before ``backward`` (loss) and before ``optimizer.step`` (gradient norm), so a skipped
    update never touches the parameters or the optimizer's moments.
    """

    def __init__(self, mode: str = "stop", max_in_row: int = 3) -> None:
        if mode not in ("stop", "skip"):
            raise RlxError(f"trainer.on_nonfinite must be stop or skip, got {mode!r}")
        if max_in_row < 1:
            raise RlxError(f"trainer.max_nonfinite must be >= 1, got {max_in_row}")
        self.mode, self.max_in_row = mode, max_in_row
        self.skipped = 0  # updates skipped in the whole run
        self.in_row = 0

    def ok(self, value: float | torch.Tensor, what: str, step: int) -> bool:
        """True if ``value`` is finite. Otherwise raise (stop), or count it and return False (skip)."""
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if math.isfinite(v):
            return True
        if self.mode == "stop":
            raise NonFiniteError(f"non-finite {what} ({v}) at iteration {step + 1}")  # h14 hook: 1-based
        self.skipped += 1
        self.in_row += 1
        if self.in_row >= self.max_in_row:  # h14 hook: iterations are 1-based in messages
            raise NonFiniteError(
                f"non-finite {what} ({v}) at iteration {step + 1}: {self.in_row} updates in a row skipped "
                f"(trainer.max_nonfinite={self.max_in_row})"
            )
        return False

    def agreed_ok(self, bad: tuple[float, str] | None, what: str, step: int) -> bool:
        """`ok` decided by every rank together (h11): ``bad`` is this rank's non-finite value and what
        it was, or None. When any rank saw one, every rank counts it (skip) or raises (stop) alike,
        so no rank goes on to a collective the others skip. One process: `ok` of its own value."""
        from rlx.distributed import agree

        if not agree(bad is not None):
            return True
        value, what = bad if bad is not None else (float("nan"), f"{what} on another rank")
        return self.ok(value, what, step)

    def update_done(self) -> None:
        self.in_row = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_row = int(state["skipped"]), int(state["in_row"])


@dataclass
class LoopContext:
    """What a loop builder gets: the checked plan and the run's shared services."""

    plan: Plan
    tracker: Tracker
    run_dir: Path
    config_yaml: str
    build_policy: Callable[[], Policy]
    make_optimizer: Callable[[ParamsT, int], tuple[torch.optim.Optimizer, Any]]
    save_checkpoint: Callable[[Trainer], Path]
    nonfinite: NonFiniteGuard
    save_every: int = 0
    stop_signal: Callable[[], int | None] = lambda: None

    def step_done(self, trainer: Trainer) -> None:
        """Call after every iteration: periodic checkpoint; on SIGINT/SIGTERM, checkpoint and stop."""
        saved: Path | None = None
        if self.save_every and trainer.step % self.save_every == 0:
            saved = self.save_checkpoint(trainer)
        from rlx.distributed import all_reduce_max

        # h11: a signal that reached any rank stops every rank at the same step
        signum = int(all_reduce_max(float(self.stop_signal() or 0))) or None
        if signum is not None:
            saved = saved or self.save_checkpoint(trainer)
            from rlx.distributed import barrier

            barrier()  # h11: no rank leaves (and has torchrun stop the others) before rank 0 has written
            raise StopRequested(signum, trainer.step, str(saved))
