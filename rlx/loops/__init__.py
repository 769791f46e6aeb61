"""Training loops, one registry entry each: ``algo.loop`` picks one (``online`` by default).

A loop module registers a builder with ``@LOOPS.register(name, plan=plan_fn)``:

- ``plan_fn(cfg: dict, task) -> settings`` checks the loop's own settings and binds its pluggable
  pieces, raising `RlxError` on bad input. It builds no model: `rlx.train.plan` runs it for every job
  of a sweep before the first one starts.
- ``builder(ctx: LoopContext) -> Trainer`` builds the models, optimizer and the trainer.

A `Trainer` carries everything the next step depends on beyond the saved model, optimizer,
scheduler and RNG states in ``state_dict()`` (plain tensors and Python values only, so that a
checkpoint loads with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rlx.registry import Registry

if TYPE_CHECKING:
    from rlx.models import Policy
    from rlx.tracking import Tracker
    from rlx.train import Plan

LOOPS = Registry("training loop", ["rlx.loops"])


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


@dataclass
class LoopContext:
    """What a loop builder gets: the checked plan and the run's shared services."""

    plan: Plan
    tracker: Tracker
    run_dir: Path
    config_yaml: str
    build_policy: Callable[[], Policy]
    make_optimizer: Callable[[Iterable[torch.nn.Parameter], int], tuple[torch.optim.Optimizer, Any]]
    save_checkpoint: Callable[[Trainer], Path]
